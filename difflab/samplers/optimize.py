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

Why a three-piece grid (``three_piece_grid``, ``fit_three_piece_grid``): on multimodal data the
probability-flow ODE has three regimes. At high noise the noisy marginal is close to one
Gaussian and the posterior over modes barely moves; at low noise one mode owns each
trajectory and the denoiser is close to affine in x; in between lies a window where the
posterior switches and each trajectory commits to a mode. The error of a few-step sampler on
such data is set in that window (a draw sent to the wrong mode costs far more than the bulk
error), so the budget belongs there. A grid that is uniform in t on each of three pieces,
with the two break times and the step counts of the outer pieces searched exhaustively on
the training draws, has four parameters: few enough to search completely and to generalise
from a training set, where Nelder-Mead on all N - 1 points is a 9-19 dimensional search that
neither converges in a few hundred evaluations nor escapes the steps of the loss where a draw
changes mode. Its result is a good start for ``optimize_grid``.
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
    if not tol > 0:
        raise ValueError(f"tol (--tol) must be > 0, got {tol}")
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
        raise ValueError(f"need 0 <= n_hard (--hard) < n (--pool) and 0 < n_easy (--easy) "
                         f"<= n - n_hard, got n={n}, "
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


def three_piece_grid(process, n: int, t_a: float, t_b: float, n_high: int,
                     n_window: int) -> Tensor:
    """N + 1 times from t_max to t_min, uniform in t on three pieces: ``n_high`` steps from
    t_max to ``t_a``, ``n_window`` steps from ``t_a`` to ``t_b`` and the rest (at least one)
    from ``t_b`` to t_min."""
    t_max, t_min = float(process.t_max), float(process.t_min)
    n_low = n - n_high - n_window
    if min(n_high, n_window, n_low) < 1 or not t_max > t_a > t_b > t_min:
        raise ValueError(f"need t_max > t_a > t_b > t_min and at least one step per piece, got "
                         f"t_a={t_a}, t_b={t_b}, steps {n_high}/{n_window}/{n_low} of {n}")
    pieces = [torch.linspace(t_max, t_a, n_high + 1, dtype=torch.float64),
              torch.linspace(t_a, t_b, n_window + 1, dtype=torch.float64)[1:],
              torch.linspace(t_b, t_min, n_low + 1, dtype=torch.float64)[1:]]
    return torch.cat(pieces)


def fit_three_piece_grid(denoiser: DenoiserFn, sampler: Callable, n: int, x_T: Tensor,
                         reference: Tensor, weights: Tensor | None = None,
                         upper: tuple[float, ...] = (0.55, 0.65, 0.75),
                         lower: tuple[float, ...] = (0.10, 0.15, 0.20, 0.25, 0.30),
                         **options: Any) -> Tensor:
    """The ``three_piece_grid`` of N steps for which ``sampler`` from ``x_T`` is closest
    (weighted RMS) to ``reference``: every pair of break times t_a, t_b (fractions ``upper``
    and ``lower`` of the way from t_min to t_max) and every split of the N steps with at
    most N // 3 + 1 on the high-noise piece. Ties keep the first grid found."""
    process = denoiser.process
    t_max, t_min = float(process.t_max), float(process.t_min)
    w = _unit_weights(weights, len(x_T))
    best, best_err = None, math.inf
    for fa in upper:
        for fb in lower:
            t_a, t_b = t_min + fa * (t_max - t_min), t_min + fb * (t_max - t_min)
            for n_high in range(1, min(n - 2, n // 3 + 1) + 1):
                for n_window in range(1, n - n_high):
                    ts = three_piece_grid(process, n, t_a, t_b, n_high, n_window)
                    err = _weighted_rms(sampler(denoiser, x_T, ts, **options), reference, w)
                    if err < best_err:
                        best, best_err = ts, err
    if best is None:
        raise ValueError(f"no three-piece grid of {n} steps (need n >= 3) gave a finite error")
    return best


def _unit_weights(weights: Tensor | None, n: int) -> Tensor:
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    return w / w.sum()


def _weighted_rms(out: Tensor, reference: Tensor, w: Tensor) -> float:
    sq = (out - reference).flatten(1).pow(2).mean(1).double()
    err = float((sq * w.to(sq.device)).sum().sqrt())
    return err if math.isfinite(err) else math.inf


def weighted_rms(out: Tensor, reference: Tensor, weights: Tensor | None = None) -> float:
    """RMS distance between ``out`` and ``reference`` [n, ...], each draw weighted by
    ``weights`` (normalised; default equal): the loss the grid fits minimise. inf if not
    finite."""
    return _weighted_rms(out, reference, _unit_weights(weights, len(out)))


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
    w = _unit_weights(weights, len(x_T))

    def loss(z: np.ndarray) -> float:
        ts = _grid_from_params(process, z, lam0, start[-1])
        if not bool((ts[1:] < ts[:-1]).all()):
            return math.inf
        return _weighted_rms(sampler(denoiser, x_T, ts, **options), reference, w)

    res = minimize(loss, z0, method="Nelder-Mead",
                   options={"maxfev": max_evals, "xatol": 1e-3, "fatol": 1e-7})
    best = res.x if res.fun <= loss(z0) else z0
    return _grid_from_params(process, best, lam0, start[-1])


#: the grids ``fit_grid`` refines (``starts``): both, or only one of them
FIT_STARTS = ("both", "default", "three-piece")


def fit_grid(denoiser: DenoiserFn, sampler: Callable, n: int, x_T: Tensor, reference: Tensor,
             weights: Tensor | None = None, max_evals: int = 300, starts: str = "both",
             **options: Any) -> tuple[Tensor, float]:
    """The full fit used by ``difflab fit-grid``: ``optimize_grid`` (``max_evals`` Nelder-Mead
    evaluations) from the default grid and from the best ``three_piece_grid`` (N >= 3), and
    the better result on ``x_T``. Neither start wins everywhere: on the benchmark mixture the
    three-piece start is ahead at 10 and 20 steps, the default one at 5. ``starts="default"``
    skips the three-piece search, which runs the sampler once per break pair and split of the
    steps (225 runs at 8 steps, more than the default Nelder-Mead budget);
    ``"three-piece"`` refines only its best grid. Returns (grid, weighted RMS)."""
    from .grids import time_grid

    if starts not in FIT_STARTS:
        raise ValueError(f"starts must be one of {', '.join(FIT_STARTS)}, got {starts!r}")
    process = denoiser.process
    w = _unit_weights(weights, len(x_T))
    three_piece = n >= 3 and starts != "default"  # below 3 steps there is no such grid
    grids = [] if three_piece and starts == "three-piece" else [time_grid(process, n)]
    if three_piece:
        grids.append(fit_three_piece_grid(denoiser, sampler, n, x_T, reference, weights,
                                          **options))
    fits = [optimize_grid(denoiser, sampler, s, x_T, reference, max_evals, weights, **options)
            for s in grids]
    errs = [_weighted_rms(sampler(denoiser, x_T, ts, **options), reference, w) for ts in fits]
    best = min(range(len(fits)), key=errs.__getitem__)
    return fits[best], errs[best]


__all__ = ["FIT_STARTS", "fit_grid", "fit_three_piece_grid", "optimize_grid", "reference_solution",
           "stratified_draws", "three_piece_grid", "weighted_rms"]
