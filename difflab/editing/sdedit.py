"""SDEdit (Meng et al. 2022): noise an input to time t0, then run a sampler from t0 to 0.

``strength`` in [0, 1] picks how much of an N-step grid is run: the last round(strength * N)
steps, starting at the grid time where they begin (0: the input back unchanged; 1: the full
grid from t_max, where q(x_T | x_0) has forgotten the input up to alpha_T). Every sampler
works, conditioned or not, because the edit only chooses the start point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn, broadcast_cond
from ..process import Process, q_sample
from ..samplers import ddim, time_grid
from ..samplers.base import Generators, randn_like
from ..samplers.grids import Spacing


def truncated_grid(process: Process, steps: int, strength: float,
                   spacing: Spacing | None = None) -> Tensor:
    """The tail of ``time_grid(process, steps, spacing)`` holding round(strength * steps)
    steps (a one-element grid [t_min] for strength 0)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    full = time_grid(process, steps, spacing)
    k = round(strength * steps)
    return full[steps - k:]


@torch.no_grad()
def sdedit(denoiser: DenoiserFn, x0: Tensor, strength: float, sampler: Callable = ddim,
           steps: int = 50, generator: Generators = None, *, cond: Any = None,
           spacing: Spacing | None = None, **options: Any) -> Tensor:
    """Edit ``x0`` [B, ...]: x_{t0} ~ q(x_{t0} | x0), then ``sampler`` from t0 to t_min.

    ``generator`` (one, or one per example) draws the forward noise and the sampler's noise.
    """
    ts = truncated_grid(denoiser.process, steps, strength, spacing)
    if len(ts) == 1:
        return x0.clone()
    x_t = q_sample(denoiser.process, x0, ts[0], randn_like(x0, generator))
    return sampler(denoiser, x_t, ts, generator, cond=cond, **options)


def variations(denoiser: DenoiserFn, x0: Tensor, seeds: list[int], strength: float,
               sampler: Callable = ddim, steps: int = 50, *, cond: Any = None,
               spacing: Spacing | None = None, **options: Any) -> Tensor:
    """len(seeds) SDEdit variations of one input x0 [1, ...], image i drawn with its own
    generator seeded seeds[i] (so each variation is reproducible on its own)."""
    if len(seeds) == 0:
        raise ValueError("variations need at least one seed (--n must be at least 1)")
    gens = [torch.Generator(device=x0.device).manual_seed(int(s)) for s in seeds]
    xs = x0.expand(len(seeds), *x0.shape[1:]).clone()
    return sdedit(denoiser, xs, strength, sampler, steps, gens,
                  cond=broadcast_cond(cond, len(seeds)), spacing=spacing,
                  **options)
