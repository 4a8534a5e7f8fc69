"""Null-text inversion of a real image for guided editing (Mokady et al. 2023).

DDIM inversion is accurate for the conditional model (guidance 1) but drifts when the noise
it finds is sampled back with classifier-free guidance gamma > 1. Null-text inversion keeps
the network and the prompt and tunes only the unconditional ("null") text embedding, one per
step (Mokady et al. 2023, Algorithm 1):

1. the pivot: DDIM inversion with guidance 1 of the image x0 under the prompt C gives
   z*_0 = x0, z*_1, ..., z*_N = x_T along the sampling grid;
2. z_bar_N = z*_N; for each step from the noise end, starting from the previous step's
   embedding, minimise || z*_{i+1} - DDIM_gamma(z_bar_i, null_i, C) ||^2 over null_i with
   Adam (a few iterations, stopping early below a tolerance), then
   z_bar_{i+1} = DDIM_gamma(z_bar_i, null_i, C).

Sampling from x_T with guidance gamma and null_i at step i (:class:`NullTextGuidance`)
then reconstructs the image, and Prompt-to-Prompt edits it with the same per-step nulls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..conditioning import TextCond
from ..guidance import ClassifierFreeGuidance
from ..parameterization import ClippedDenoiser, DenoiserFn, Prediction
from ..process import as_time
from ..samplers.base import check_grid
from .inversion import ode_invert

__all__ = ["NullTextGuidance", "NullTextInversion", "invert_image", "null_text_inversion",
           "pivot_trajectory", "step_index"]


def step_index(ts: Tensor, t: Tensor | float) -> int:
    """The step of the decreasing grid ``ts`` whose interval (ts[i+1], ts[i]] holds t."""
    tol = 1e-9 * max(1.0, float(ts[0]))
    return int((ts[1:-1] >= float(t) - tol).sum())


class NullTextGuidance:
    """Classifier-free guidance with the null embedding ``nulls[i]`` (one row each) at step i
    of the grid ``ts``: eps(null_i) + gamma (eps(y) - eps(null_i)), one batched call
    [cond; null] as :class:`~difflab.guidance.ClassifierFreeGuidance`."""

    def __init__(self, denoiser: DenoiserFn, scale: float, nulls: Sequence[TextCond],
                 ts: Tensor) -> None:
        self.ts = check_grid(ts)
        if len(nulls) != len(self.ts) - 1:
            raise ValueError(f"{len(nulls)} null embeddings for a grid of "
                             f"{len(self.ts) - 1} steps")
        self.inner, self.scale, self.nulls = denoiser, scale, list(nulls)
        self.process = denoiser.process

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        i = step_index(self.ts, float(as_time(t).flatten()[0]))
        null = self.nulls[i].to(x.device)
        return ClassifierFreeGuidance(self.inner, self.scale, null_cond=null)(x, t, cond)


@dataclass
class NullTextInversion:
    """The result: the pivot's noise ``x_T`` [1, ...], the grid ``ts``, the guidance scale
    and one optimised null embedding per step (``nulls[i]`` for ts[i] -> ts[i+1]); ``losses``
    are the final per-step squared errors to the pivot (mean over elements)."""

    x_T: Tensor
    ts: Tensor
    nulls: list[TextCond]
    guidance: float
    losses: list[float] = field(default_factory=list)

    def denoiser(self, denoiser: DenoiserFn, clip: tuple[float, float] | None = None
                 ) -> DenoiserFn:
        """``denoiser`` (unguided) guided with the per-step nulls, clipped to ``clip``."""
        den: DenoiserFn = NullTextGuidance(denoiser, self.guidance, self.nulls, self.ts)
        return den if clip is None else ClippedDenoiser(den, *clip)


def pivot_trajectory(denoiser: DenoiserFn, x0: Tensor, ts: Tensor, cond: Any
                     ) -> list[Tensor]:
    """DDIM inversion of x0 with ``denoiser`` (guidance 1): x at every time of the decreasing
    grid ``ts`` (entry k at ts[k]; the last entry is x0, the first the noise)."""
    n = len(ts) - 1
    out: list[Tensor] = [x0] * (n + 1)

    def keep(info: Any) -> None:
        out[n - 1 - info.i] = info.x  # the inversion walks the grid upwards

    ode_invert(denoiser, x0, ts, "ddim", keep, cond=cond)
    return out


def _ddim_guided(c: Prediction, u: Prediction, x: Tensor, scale: float, alpha_sigma: Tensor,
                 i: int, clip: tuple[float, float] | None) -> Tensor:
    """One guided DDIM step (eta = 0) from ts[i] to ts[i+1] given the conditional and null
    predictions at x; the last step returns x0_hat, as the ``ddim`` sampler does."""
    a, s = alpha_sigma[0].to(x.dtype), alpha_sigma[1].to(x.dtype)
    x0 = u.x0 + scale * (c.x0 - u.x0)
    eps = u.eps + scale * (c.eps - u.eps)
    if clip is not None:  # ClippedDenoiser: eps recomputed from the clipped x0
        x0 = x0.clamp(*clip)
        eps = (x - a[i] * x0) / s[i]
    if i == alpha_sigma.shape[1] - 2:
        return x0
    return a[i + 1] * x0 + s[i + 1] * eps


def null_text_inversion(denoiser: DenoiserFn, x0: Tensor, ts: Tensor, cond: TextCond,
                        null: TextCond, guidance: float, *,
                        clip: tuple[float, float] | None = None, iters: int = 10,
                        lr: float = 1e-2, tol: float = 1e-5) -> NullTextInversion:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1) of x0 [1, ...] under the prompt
    embedding ``cond`` (one row) with the unguided ``denoiser``, on the decreasing grid
    ``ts``, for guidance scale ``guidance`` (gamma): ``null`` (e.g. the empty prompt) is the
    starting null embedding, optimised with Adam (``lr``) for at most ``iters`` iterations
    per step, stopping when the squared error to the pivot is below ``tol``. ``clip``: the
    data range x0_hat is clipped to (as in sampling)."""
    if x0.shape[0] != 1 or len(cond) != 1 or len(null) != 1:
        raise ValueError("null-text inversion takes one image, one prompt and one null")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    ts = check_grid(ts)
    base = denoiser if clip is None else ClippedDenoiser(denoiser, *clip)
    pivot = pivot_trajectory(base, x0, ts, cond)
    alpha_sigma = torch.stack(denoiser.process.alpha_sigma(ts))  # [2, N + 1]
    tokens, mask = null.tokens.detach().clone(), null.mask
    x, nulls, losses = pivot[0], [], []
    for i in range(len(ts) - 1):
        with torch.no_grad():
            c = denoiser(x, ts[i], cond)
        tokens = tokens.clone().requires_grad_(True)
        opt = torch.optim.Adam([tokens], lr=lr)
        for _ in range(iters):
            u = denoiser(x, ts[i], TextCond(tokens, mask))
            loss = (_ddim_guided(c, u, x, guidance, alpha_sigma, i, clip)
                    - pivot[i + 1]).pow(2).mean()
            if float(loss.detach()) < tol:
                break
            (tokens.grad,) = torch.autograd.grad(loss, [tokens])
            opt.step()
        tokens = tokens.detach()
        with torch.no_grad():
            u = denoiser(x, ts[i], TextCond(tokens, mask))
            x = _ddim_guided(c, u, x, guidance, alpha_sigma, i, clip)
        nulls.append(TextCond(tokens.clone(), mask.clone()))
        losses.append(float((x - pivot[i + 1]).pow(2).mean()))
    return NullTextInversion(pivot[0], ts, nulls, float(guidance), losses)


def invert_image(pipe: Any, image: Tensor, prompt: str, *, guidance: float = 5.0,
                 steps: int = 50, iters: int = 10, lr: float = 1e-2, tol: float = 1e-5
                 ) -> NullTextInversion:
    """Null-text inversion of ``image`` [1, C, H, W] (in the data range; encoded first for a
    latent model) under ``prompt`` with a text :class:`~difflab.pipeline.Pipeline`, its
    empty prompt as the starting null, on ``steps`` steps of its default time grid."""
    from ..samplers import time_grid

    if not pipe.is_text:
        raise ValueError("null-text inversion needs a text-conditional model; this one is not")
    z = pipe.encode(image.to(pipe.device))
    ts = time_grid(pipe.process, steps)
    cond, null = pipe.encode_prompts([prompt]), pipe.encode_prompts([""])
    rng = pipe.stage.data_range
    return null_text_inversion(pipe.base, z, ts, cond, null, guidance, iters=iters, lr=lr,
                               tol=tol, clip=None if rng is None else tuple(rng))

