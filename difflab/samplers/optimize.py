"""Time grids optimised for one model, one sampler and one NFE, on the model's own trajectories.

The error of a few-step sampler depends mostly on where its steps are. Given a denoiser, a
sampler and a budget of N steps, ``optimize_grid`` moves the N - 1 interior grid points to
minimise the RMS distance between the sampler's output and an accurate solution of the same
model's probability-flow ODE from training noise (``reference_solution``: DOP853 at tight
tolerances). The grid is parameterised by log-SNR increments, lambda_{j+1} = lambda_j +
exp(z_j), so it stays strictly decreasing in t, and searched with Nelder-Mead from a given
start grid (in the spirit of "Align Your Steps", Sabour et al. 2024, and DMN/GITS, which
optimise grids against reference trajectories). The result is a plain tensor of times that can
be stored with the model (``save_time_grid``) and passed as ``ts`` to the sampler.

Why a stratified training set (``stratified_draws``): on multimodal data a few noise draws lie
near the boundary between modes, where the PF-ODE map is very sensitive; a few-step sampler
sends them to the wrong mode, and these rare draws dominate the RMS error at 10-15 steps. A
grid fitted on a plain 200-draw set sees too few of them and fits their particulars. Instead,
draw many noises, rank them by a cheap sensitivity proxy (the gap between a coarse and a fine
PLMS solution; no reference needed), keep the top ones and a uniform subsample of the rest,
weighted by the inverse of their sampling rate: the weighted RMS is an unbiased estimate of
the RMS over all the draws (stratified sampling, e.g. Owen 2013, "Monte Carlo theory", ch. 8),
at the cost of accurate references for the kept draws only.
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


def stratified_draws(denoiser: DenoiserFn, pool: Tensor, n_hard: int, n_easy: int,
                     generator: torch.Generator | None = None, coarse: int = 8,
                     fine: int = 32) -> tuple[Tensor, Tensor]:
    """Training noise for ``optimize_grid`` from a ``pool`` of x_T draws [n, ...]: the
    ``n_hard`` most sensitive ones (largest RMS gap between PLMS on ``coarse`` and on ``fine``
    steps of the default grid) and ``n_easy`` uniformly chosen others. Returns (x_T, weights):
    weight 1 for the hard draws and (n - n_hard) / n_easy for the others, so weighted means
    over the kept draws are unbiased estimates of means over the whole pool."""
    from .grids import time_grid
    from .multistep import plms

    n = len(pool)
    if not 0 <= n_hard < n or not 0 < n_easy <= n - n_hard:
        raise ValueError(f"need 0 <= n_hard < n and 0 < n_easy <= n - n_hard, got n={n}, "
                         f"n_hard={n_hard}, n_easy={n_easy}")
    process = denoiser.process
    gap = (plms(denoiser, pool, time_grid(process, coarse))
           - plms(denoiser, pool, time_grid(process, fine))).flatten(1).pow(2).mean(1)
    keep, weights = stratify(gap, n_hard, n_easy, generator)
    return pool[keep], weights


def stratify(score: Tensor, n_hard: int, n_easy: int,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Indices of the ``n_hard`` largest ``score`` entries and of ``n_easy`` others drawn
    uniformly without replacement, with weights 1 and (n - n_hard) / n_easy: each of the
    others is kept with probability n_easy / (n - n_hard), so the weighted sum of any per-draw
    quantity over the kept indices has the sum over all n as its expectation."""
    order = score.argsort(descending=True)
    rest = order[n_hard:]
    easy = rest[torch.randperm(len(rest), generator=generator)[:n_easy]]
    weights = torch.cat([torch.ones(n_hard, dtype=torch.float64),
                         torch.full((n_easy,), len(rest) / n_easy, dtype=torch.float64)])
    return torch.cat([order[:n_hard], easy]), weights


def _grid_from_params(process, z: np.ndarray, lam0: float, t_end: Tensor) -> Tensor:
    lam = lam0 + np.cumsum(np.exp(z))
    ts = process.t_from_log_snr(torch.tensor(lam, dtype=torch.float64))
    start = torch.tensor([process.t_max], dtype=torch.float64)
    return torch.cat([start, ts, t_end.reshape(1)])


def optimize_grid(denoiser: DenoiserFn, sampler: Callable, start: Tensor, x_T: Tensor,
                  reference: Tensor, max_evals: int = 400, weights: Tensor | None = None,
                  **options: Any) -> Tensor:
    """Optimise the interior points of the grid ``start`` (N + 1 times, t_max ... t_min) for
    ``sampler`` so that its output from ``x_T`` is closest (RMS) to ``reference``; with
    per-draw ``weights`` (e.g. from ``stratified_draws``) the RMS is weighted. The last noisy
    level is an interior point too, so the final step's length is fitted as well."""
    from scipy.optimize import minimize

    process = denoiser.process
    start = start.to(torch.float64)
    if len(start) < 3:
        return start
    lam = process.log_snr(start[:-1]).numpy()
    lam0 = float(lam[0])
    z0 = np.log(np.diff(lam))
    w = torch.ones(len(x_T), dtype=torch.float64) if weights is None else weights.to(
        torch.float64)
    w = w / w.sum()

    def loss(z: np.ndarray) -> float:
        ts = _grid_from_params(process, z, lam0, start[-1])
        if not bool((ts[1:] < ts[:-1]).all()):
            return math.inf
        out = sampler(denoiser, x_T, ts, **options)
        err = float(((out - reference).flatten(1).pow(2).mean(1) * w).sum().sqrt())
        return err if math.isfinite(err) else math.inf

    res = minimize(loss, z0, method="Nelder-Mead",
                   options={"maxfev": max_evals, "xatol": 1e-3, "fatol": 1e-7})
    best = res.x if res.fun <= loss(z0) else z0
    return _grid_from_params(process, best, lam0, start[-1])


__all__ = ["optimize_grid", "reference_solution", "stratified_draws"]
