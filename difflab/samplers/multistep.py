"""Linear multistep samplers in the EDM variables y = x / alpha, sigma~ = sigma / alpha, where
the probability-flow ODE is dy / dsigma~ = eps_hat (Karras et al. 2022, eq. 4).

- ``plms``: pseudo linear multistep (Liu et al. 2022, "PNDM", eq. 12): the fixed 4th-order
  Adams-Bashforth combination (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24 of eps_hat,
  moved by the DDIM transfer (which is exact in y for a constant eps); the first steps use the
  lower-order Adams-Bashforth combinations. Its coefficients assume equal steps in sigma~:
  order 4 there, order 2 on other smooth grids.
- ``lms``: variable-step Adams-Bashforth of order ``order`` (Lagrange polynomial of eps_hat in
  sigma~ integrated exactly over each step), the method of diffusers' LMSDiscreteScheduler.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..parameterization import DenoiserFn, Prediction
from .base import Callback, Generators, check_grid, final_step, report, zero_snr_start
from .expint import lagrange_weights

AB_COEFFS = ([1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12],
             [55 / 24, -59 / 24, 37 / 24, -9 / 24])


@torch.no_grad()
def _ab_in_sigma(denoiser: DenoiserFn, x: Tensor, ts: Tensor, callback: Callback | None,
                 cond: Any, weights: list[list[float]]) -> Tensor:
    """y_{i+1} = y_i + sum_j weights[i][j] eps_{i-j}; with a weight list for the last step
    too, it is the multistep step to sigma~ = 0 (clean data), else the shared x0_hat step."""
    process = denoiser.process
    a = process.alpha(ts).tolist()
    y = x / a[0]
    hist: list[Tensor] = []
    for i in range(len(ts) - 1):
        pred = denoiser(a[i] * y, ts[i], cond)
        if i == len(ts) - 2 and len(weights) < len(ts) - 1:
            return final_step(callback, i, ts[i], pred)
        hist = [pred.eps, *hist][: len(weights[i])]
        for wj, ej in zip(weights[i], hist, strict=False):
            y = y + wj * ej
        if i == len(ts) - 2:  # the multistep step to clean data: x = y, nothing left to denoise
            report(callback, i, ts[i], y, Prediction(x0=y, eps=pred.eps))
            return y
        report(callback, i, ts[i], a[i + 1] * y, pred)
    return x


def final_sigma_step(x: Tensor, alpha: float, st: list[float], eps_hist: list[Tensor],
                     order: int) -> Tensor:
    """A higher-order last step for any sampler: from x at sigma~_{N-1} to sigma~ = 0 by the
    Adams-Bashforth rule in sigma~ on the latest eps_hat (newest first). With one output it is
    the Euler step, i.e. x0_hat; ``st`` is sigma~ on the whole grid."""
    (w,) = _final_weights(st, order)
    y = x / alpha
    for wj, ej in zip(w, eps_hist, strict=False):
        y = y + wj * ej
    return y


def _final_weights(st: list[float], order: int) -> list[list[float]]:
    """Adams-Bashforth weights of the last step, from sigma~_{N-1} to sigma~_N = 0, on the
    latest ``order`` outputs; none where t_min is still noisy."""
    if st[-1] > 0:
        return []
    n = len(st) - 2
    h = -st[n]
    nodes = [st[n - j] - st[n] for j in range(min(order, n + 1))]  # newest first
    return [[h * w for w in lagrange_weights(nodes, h, 0.0)]]


def _sigma_tilde(process, ts: Tensor) -> list[float]:
    return (-0.5 * process.log_snr(ts)).exp().tolist()


@zero_snr_start
def plms(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None,
         final: Literal["multistep", "denoise"] = "multistep") -> Tensor:
    """PLMS (Liu et al. 2022, eq. 12) with Adams-Bashforth warm-up; one evaluation per step.
    ``final="multistep"``: the last step to sigma~ = 0 is a variable-step Adams-Bashforth step
    of order 4 (the steps are unequal there) instead of returning x0_hat."""
    ts = check_grid(ts)
    st = _sigma_tilde(denoiser.process, ts)
    weights = [[(st[i + 1] - st[i]) * c for c in AB_COEFFS[min(i, 3)]]
               for i in range(len(ts) - 2)]
    if final == "multistep":
        weights += _final_weights(st, 4)
    return _ab_in_sigma(denoiser, x, ts, callback, cond, weights)


@zero_snr_start
def lms(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
        callback: Callback | None = None, *, cond: Any = None, order: int = 4,
        final: Literal["multistep", "denoise"] = "multistep") -> Tensor:
    """Variable-step Adams-Bashforth in sigma~ (linear multistep, order ``order``);
    ``final="multistep"`` takes the last step to sigma~ = 0 the same way."""
    ts = check_grid(ts)
    st = _sigma_tilde(denoiser.process, ts)
    weights = []
    for i in range(len(ts) - 2):
        h = st[i + 1] - st[i]
        nodes = [st[i - j] - st[i] for j in range(min(order, i + 1))]
        weights.append([h * w for w in lagrange_weights(nodes, h, 0.0)])
    if final == "multistep":
        weights += _final_weights(st, order)
    return _ab_in_sigma(denoiser, x, ts, callback, cond, weights)


__all__ = ["lms", "plms"]
