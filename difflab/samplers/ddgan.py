"""Sampling a denoising diffusion GAN (Xiao et al. 2022, Sec. 3-4): T ancestral steps, each
x0' = G(x_t, z, t) with a fresh latent z ~ N(0, I), then x_s ~ q(x_s | x_t, x0') (the
posterior of the forward process on the grid, DDPM's update); the last step returns x0'.

z comes from the sampler's generator (per image with per-seed generators), drawn before
each network call, so an image depends only on its seed. The network receives it as
``LatentCond(labels, z)`` (``networks.latent``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..conditioning import LatentCond
from ..parameterization import DenoiserFn, Prediction
from .ancestral import ddpm
from .base import Callback, Generators, randn_like
from .options import declare_options


class LatentDenoiser:
    """A denoiser whose every call gets a fresh latent z ~ N(0, I) of x's shape from
    ``generator``, passed with the condition as ``LatentCond``."""

    def __init__(self, denoiser: DenoiserFn, generator: Generators):
        self.inner, self.generator, self.process = denoiser, generator, denoiser.process

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        return self.inner(x, t, LatentCond(cond, randn_like(x, self.generator)))


@declare_options()
@torch.no_grad()
def ddgan(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
          callback: Callback | None = None, *, cond: Any = None) -> Tensor:
    """DDGAN's sampler: DDPM's posterior steps (beta_tilde) with x0' = G(x_t, z, t) and a
    fresh z per step from ``generator``."""
    return ddpm(LatentDenoiser(denoiser, generator), x, ts, generator, callback, cond=cond,
                variance="beta_tilde")


__all__ = ["LatentDenoiser", "ddgan"]
