"""Interpolating between two images through the diffusion model.

- ``slerp`` of the DDIM-inverted noises, then reconstruction (Song et al. 2021, sec. 5.3):
  Gaussian noise lives near a sphere, and spherical interpolation keeps its norm there;
- DDPM's coarse-to-fine variant (Ho et al. 2020, sec. 4.3): encode both images to an
  intermediate time t with q(x_t | x_0), mix linearly, and denoise with the stochastic reverse
  process; larger t keeps less of either source.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn, broadcast_cond
from ..process import q_sample
from ..samplers import ddpm
from ..samplers.base import Generators, randn_like
from .inversion import ddim_invert, reconstruct


def slerp(z0: Tensor, z1: Tensor, lam: float | Tensor) -> Tensor:
    """Spherical interpolation per example [B, ...]; linear where the two are parallel."""
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)
    theta = torch.arccos(cos.clamp(-1, 1))[:, None]
    lam = torch.as_tensor(lam, dtype=a.dtype)
    sin = torch.sin(theta)
    w0 = torch.where(sin > 1e-6, torch.sin((1 - lam) * theta) / sin, 1 - lam)
    w1 = torch.where(sin > 1e-6, torch.sin(lam * theta) / sin, lam)
    return (w0 * a + w1 * b).reshape(z0.shape)


@torch.no_grad()
def interpolate(denoiser: DenoiserFn, x_a: Tensor, x_b: Tensor, lams: Tensor, ts: Tensor, *,
                cond: Any = None) -> Tensor:
    """Images along slerp(invert(x_a), invert(x_b), lam) for each lam; x_a, x_b: [1, ...].
    Returns [len(lams), ...]; lam = 0 and 1 give the reconstructions of the inputs."""
    z = ddim_invert(denoiser, torch.cat([x_a, x_b]), ts, cond=broadcast_cond(cond, 2))
    zs = torch.cat([slerp(z[:1], z[1:], float(lam)) for lam in lams])
    return reconstruct(denoiser, zs, ts, cond=broadcast_cond(cond, len(zs)))


@torch.no_grad()
def interpolate_coarse_to_fine(denoiser: DenoiserFn, x_a: Tensor, x_b: Tensor, lams: Tensor,
                               ts: Tensor, generator: Generators = None, *,
                               cond: Any = None) -> Tensor:
    """Ho et al.'s variant: x_t = (1 - lam) q(x_a) + lam q(x_b) at t = ts[0] (same noise for
    both), then DDPM ancestral sampling down ``ts``."""
    noise = randn_like(x_a, generator)
    za, zb = (q_sample(denoiser.process, x, ts[0], noise) for x in (x_a, x_b))
    mixed = torch.cat([(1 - float(lam)) * za + float(lam) * zb for lam in lams])
    return ddpm(denoiser, mixed, ts, generator, cond=broadcast_cond(cond, len(mixed)))
