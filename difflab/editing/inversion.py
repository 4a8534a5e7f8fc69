"""Deterministic inversion x0 -> x_T and reconstruction x_T -> x0 (DDIM, Song et al. 2021).

Reconstruction is DDIM with eta = 0 on a grid ts (decreasing). Inversion walks the same grid
upwards with the DDIM update read the other way: from x_k at t_k to t_{k+1},

  eps_hat = eps(x_k, t_{k+1}),  x_{k+1} = alpha_{k+1} (x_k - sigma_k eps_hat) / alpha_k
                                          + sigma_{k+1} eps_hat,

the explicit approximation of the implicit inverse step (which needs eps at x_{k+1}); the
network is asked at the destination time, as in Mokady et al. 2023, so it is never evaluated at
t = 0. The error of inversion + reconstruction shrinks at first order as the grid is refined.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from ..process import expand_like
from ..samplers import ddim
from ..samplers.base import Callback, check_grid, report


@torch.no_grad()
def ddim_invert(denoiser: DenoiserFn, x0: Tensor, ts: Tensor, callback: Callback | None = None,
                *, cond: Any = None) -> Tensor:
    """Map data x0 (at ts[-1]) to noise at ts[0] along the reversed sampling grid ``ts``."""
    ts = check_grid(ts).flip(0)
    a, sig = denoiser.process.alpha_sigma(ts)
    x = x0
    for k in range(len(ts) - 1):
        pred = denoiser(x, ts[k + 1], cond)
        eps = pred.eps
        x0_hat = (x - expand_like(sig[k], x) * eps) / expand_like(a[k], x)
        x = a[k + 1] * x0_hat + sig[k + 1] * eps
        report(callback, k, ts[k + 1], x, pred)
    return x


def reconstruct(denoiser: DenoiserFn, x_T: Tensor, ts: Tensor, *, cond: Any = None) -> Tensor:
    """DDIM (eta = 0) from x_T at ts[0] down the grid: the inverse of ``ddim_invert``."""
    return ddim(denoiser, x_T, ts, cond=cond)
