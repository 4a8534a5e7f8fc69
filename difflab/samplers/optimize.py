"""Time grids optimised for one model, one sampler and one NFE, on the model's own trajectories.

The error of a few-step sampler depends mostly on where its steps are. Given a denoiser, a
sampler and a budget of N steps, ``optimize_grid`` moves the N - 1 interior grid points to
minimise the RMS distance between the sampler's output and an accurate solution of the same
model's probability-flow ODE from training noise (``reference_solution``: DOP853 at tight
tolerances). The grid is parameterised by log-SNR increments, lambda_{j+1} = lambda_j +
exp(z_j), so it stays strictly decreasing in t, and searched with Nelder-Mead from a given
start grid (in the spirit of "Align Your Steps", Sabour et al. 2024, and DMN/GITS, which
optimise grids against reference trajectories). The result is a plain tensor of times that can
be stored with the model (e.g. in its JSON config) and passed as ``ts`` to the sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from .rk import rk45


def reference_solution(denoiser: DenoiserFn, x_T: Tensor, tol: float = 1e-8,
                       sigma_end: float = 1e-4) -> Tensor:
    """The model's own PF-ODE solution from x_T at t_max (DOP853 at ``tol``) down to
    sigma~ = ``sigma_end``, then x0_hat there (an O(sigma_end^2) step to clean data)."""
    process = denoiser.process
    t_end = process.t_from_log_snr(torch.tensor(-2 * math.log(sigma_end), dtype=torch.float64))
    ts = torch.stack([torch.tensor(process.t_max, dtype=torch.float64), t_end,
                      torch.tensor(process.t_min, dtype=torch.float64)])
    return rk45(denoiser, x_T, ts, rtol=tol, atol=tol, method="DOP853")


def _grid_from_params(process, z: np.ndarray, lam0: float, t_end: Tensor) -> Tensor:
    lam = lam0 + np.cumsum(np.exp(z))
    ts = process.t_from_log_snr(torch.tensor(lam, dtype=torch.float64))
    start = torch.tensor([process.t_max], dtype=torch.float64)
    return torch.cat([start, ts, t_end.reshape(1)])


def optimize_grid(denoiser: DenoiserFn, sampler: Callable, start: Tensor, x_T: Tensor,
                  reference: Tensor, max_evals: int = 400, **options: Any) -> Tensor:
    """Optimise the interior points of the grid ``start`` (N + 1 times, t_max ... t_min) for
    ``sampler`` so that its output from ``x_T`` is closest (RMS) to ``reference``."""
    from scipy.optimize import minimize

    process = denoiser.process
    start = start.to(torch.float64)
    if len(start) < 3:
        return start
    lam = process.log_snr(start[:-1]).numpy()
    lam0 = float(lam[0])
    z0 = np.log(np.diff(lam))

    def loss(z: np.ndarray) -> float:
        ts = _grid_from_params(process, z, lam0, start[-1])
        if not bool((ts[1:] < ts[:-1]).all()):
            return math.inf
        out = sampler(denoiser, x_T, ts, **options)
        err = float((out - reference).pow(2).mean().sqrt())
        return err if math.isfinite(err) else math.inf

    res = minimize(loss, z0, method="Nelder-Mead",
                   options={"maxfev": max_evals, "xatol": 1e-3, "fatol": 1e-7})
    best = res.x if res.fun <= loss(z0) else z0
    return _grid_from_params(process, best, lam0, start[-1])


__all__ = ["optimize_grid", "reference_solution"]
