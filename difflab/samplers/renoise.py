"""Multistep sampling of a few-step student by re-noising its clean estimate.

At each grid time t_i the network maps x_{t_i} straight to x0_hat; the next state is a fresh
forward draw x_{t_{i+1}} = alpha_{t_{i+1}} x0_hat + sigma_{t_{i+1}} z, z ~ N(0, I) (Sauer et
al. 2023, ADD, Sec. 4 "multi-step sampling"; the same scheme as the multistep consistency
sampler, Song et al. 2023, Algorithm 1). The last step returns x0_hat.

A student trained at a top time below t_max (an eps-predicting student cannot recover x0
where alpha ~ 0) starts there: ``t_start`` replaces the grid's first time, and the initial
pure noise is taken as x at ``t_start`` (as ADD does at t = 999 of Stable Diffusion).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from .base import Callback, Generators, check_grid, final_step, randn_like, report
from .options import SamplerOption, declare_options


def start_grid(ts: Tensor, t_start: float | None) -> Tensor:
    """``ts`` with its first time replaced by ``t_start`` (None: unchanged); a ValueError
    naming the option unless ``t_start`` lies above the grid's second time."""
    ts = check_grid(ts)
    if t_start is None:
        return ts
    if not t_start > float(ts[1]):
        raise ValueError(f"sampler 'renoise': t_start={t_start:g} must exceed the grid's "
                         f"second time {float(ts[1]):g}; use fewer --steps")
    ts = ts.clone()
    ts[0] = t_start
    return ts


@declare_options(SamplerOption(
    "t_start", float, None, "time of the first network evaluation (the initial noise is "
    "taken as x there); None: the grid's first time", min=0.0, min_exclusive=True))
@torch.no_grad()
def renoise(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
            callback: Callback | None = None, *, cond: Any = None,
            t_start: float | None = None) -> Tensor:
    """x0_hat = D(x_{t_i}, t_i), then x_{t_{i+1}} = alpha x0_hat + sigma z (ADD's and the
    consistency models' multistep sampler); returns the last x0_hat."""
    ts = start_grid(ts, t_start)
    a, s = denoiser.process.alpha_sigma(ts)
    for i in range(len(ts) - 1):
        pred = denoiser(x, ts[i], cond)
        if i == len(ts) - 2:
            return final_step(callback, i, ts[i], pred)
        x = a[i + 1].to(x.dtype) * pred.x0 + s[i + 1].to(x.dtype) * randn_like(x, generator)
        report(callback, i, ts[i], x, pred)
    raise AssertionError("unreachable: a grid has at least two times")


__all__ = ["renoise", "start_grid"]
