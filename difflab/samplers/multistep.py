"""Linear multistep samplers in the EDM variables y = x / alpha, sigma~ = sigma / alpha, where
the probability-flow ODE is dy / dsigma~ = eps_hat (Karras et al. 2022, eq. 4).

- ``plms``: pseudo linear multistep (Liu et al. 2022, "PNDM", eq. 12): the fixed 4th-order
  Adams-Bashforth combination (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24 of eps_hat,
  moved by the DDIM transfer (which is exact in y for a constant eps); the first steps use the
  lower-order Adams-Bashforth combinations. Its coefficients assume equal steps in sigma~:
  order 4 there, order 2 on other smooth grids.
- ``lms``: variable-step Adams-Bashforth of order ``order`` (Lagrange polynomial of eps_hat in
  sigma~ integrated exactly over each step), the method of diffusers' LMSDiscreteScheduler.

By default both end with a multistep step to clean data (``final_order``, ``base``): plms of
order 4, lms of its ``order``; ``final_order=1`` returns x0_hat of the last evaluation instead,
``final_order=0`` the local-Gaussian step (``base.gaussian_final_step``).

Both hold for steps of either sign in sigma~: on a rising grid (inversion) they run the same
Adams-Bashforth steps upwards, with no final step, and return x at the last grid point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn, Prediction
from .base import (
    Callback,
    Generators,
    check_ode_grid,
    final_step,
    final_weights,
    report,
    two_point_fit,
    zero_snr_start,
)
from .expint import lagrange_weights
from .grids import noisy_end_grid
from .options import SamplerOption, declare_options, final_order_option, gaussian_fit_option

AB_COEFFS = ([1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12],
             [55 / 24, -59 / 24, 37 / 24, -9 / 24])


@torch.no_grad()
def _ab_in_sigma(denoiser: DenoiserFn, x: Tensor, ts: Tensor, callback: Callback | None,
                 cond: Any, weights: list[list[float]], rising: bool = False,
                 gaussian: bool = False, heun_start: bool = False,
                 two_point: bool = False) -> Tensor:
    """y_{i+1} = y_i + sum_j weights[i][j] eps_{i-j}; with a weight list for the last step
    too, it is the multistep step to sigma~ = 0 (clean data), else the shared x0_hat step.
    On a rising grid every step is an ordinary step and x at ts[-1] is returned.
    ``heun_start``: the first step (unless it is the last) is instead the trapezoidal step
    y_1 = y_0 + h (eps_0 + eps_hat(y_0 + h eps_0, sigma~_1)) / 2 (one more evaluation, whose
    output is not kept in the history), as in PNDM's pseudo-numerical warm-up. ``two_point``:
    the local-Gaussian last step (``gaussian``) fits both evaluations (``gaussian_fit``)."""
    process = denoiser.process
    a = process.alpha(ts).tolist()
    y = x / a[0]
    depth = max(map(len, weights), default=1)  # outputs any step uses (zip takes its share)
    hist: list[Tensor] = []
    x0_prev = None  # x0_hat of the previous grid point's evaluation (two_point)
    for i in range(len(ts) - 1):
        pred = denoiser(a[i] * y, ts[i], cond)
        if i == len(ts) - 2 and len(weights) < len(ts) - 1:
            return final_step(callback, i, ts[i], pred, sigma_tilde=_sigma_tilde(process, ts),
                              eps_hist=[pred.eps, *hist][:2] if gaussian else None,
                              gaussian=gaussian, x0_prev=x0_prev if two_point else None)
        hist = [pred.eps, *hist][:depth]
        x0_prev = pred.x0
        if i == 0 and heun_start and i < len(weights) and (len(ts) > 2 or rising):
            # Heun / trapezoidal first step (Liu et al. 2022, the 2nd-order pseudo step)
            h = weights[0][0]
            pred_1 = denoiser(a[1] * (y + h * pred.eps), ts[1], cond)
            y = y + 0.5 * h * (pred.eps + pred_1.eps)
            report(callback, i, ts[i], a[1] * y, pred)
            continue
        for wj, ej in zip(weights[i], hist, strict=False):
            y = y + wj * ej
        if i == len(ts) - 2 and not rising:  # the step to clean data: x = y, no noise left
            report(callback, i, ts[i], y, Prediction(x0=y, eps=pred.eps))
            return y
        report(callback, i, ts[i], a[i + 1] * y, pred)
    return a[-1] * y


def _sigma_tilde(process, ts: Tensor) -> list[float]:
    return (-0.5 * process.log_snr(ts)).exp().tolist()


@declare_options(
    final_order_option(4),
    SamplerOption("warm_start", str, "ab", "first step: 'ab' (Euler, then Adams-Bashforth of "
                  "rising order; one evaluation per step) or 'heun' (a trapezoidal first step "
                  "with one more evaluation, as diffusers' PNDM with skip_prk_steps)",
                  choices=("ab", "heun")),
    SamplerOption("noisy_end", bool, False, "end at a noisy level, stepping to it with the "
                  "PLMS combination like the others, and return x there: the grid's last time "
                  "or, where that is sigma = 0, the process's first level (diffusers' PNDM end "
                  "with set_alpha_to_one=False)"),
    gaussian_fit_option())
@zero_snr_start
def plms(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None, final_order: int = 4,
         warm_start: str = "ab", noisy_end: bool = False,
         gaussian_fit: str = "eps_ratio") -> Tensor:
    """PLMS (Liu et al. 2022, eq. 12) with Adams-Bashforth warm-up; one evaluation per step.
    ``final_order`` = 4: the last step to sigma~ = 0 is a variable-step Adams-Bashforth step of
    order 4 (the steps are unequal there); 1 returns x0_hat instead. ``warm_start="heun"``:
    the first step is the second-order trapezoidal step (local error O(h^3) instead of
    Euler's O(h^2)) at one extra evaluation (N + 1 for N >= 2 steps), the history then
    continues from eps_hat at the corrected state, as PNDM's PLMS does (diffusers'
    ``PNDMScheduler(skip_prk_steps=True)``; the paper's full warm-up is 3 Runge-Kutta steps).

    ``noisy_end`` (off by default): the run ends at the grid's last noisy level
    (``grids.noisy_end_grid``: a grid ending at sigma = 0 ends at the process's first level
    instead); every step, the last one too,
    is the PLMS step of its place in the warm-up, and x at ts[-1] is returned (still holding
    that level's noise; ``final_order`` does not apply). With ts[-1] the first level of a
    1000-level table this is diffusers' PNDM, whose last step lands on alpha_bar_0 when
    ``set_alpha_to_one`` is False (its default). Where the data scale is about that level's
    sigma~ the remaining noise has about the right size and beats every step to sigma = 0."""
    ts, rising = check_ode_grid(ts, denoiser.process)
    if noisy_end and not rising:
        ts = noisy_end_grid(denoiser.process, ts)
        rising = True  # the last step is an ordinary step and x at ts[-1] is returned
    st = _sigma_tilde(denoiser.process, ts)
    weights = [[(st[i + 1] - st[i]) * c for c in AB_COEFFS[min(i, 3)]]
               for i in range(len(ts) - (1 if rising else 2))]
    if final_order > 1 and not rising:
        weights += final_weights(st, final_order)
    return _ab_in_sigma(denoiser, x, ts, callback, cond, weights, rising, final_order == 0,
                        heun_start=warm_start == "heun", two_point=two_point_fit(gaussian_fit))


@declare_options(
    SamplerOption("order", int, 4, "order of the Adams-Bashforth steps", min=1),
    final_order_option(None, "; default: order"), gaussian_fit_option())
@zero_snr_start
def lms(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
        callback: Callback | None = None, *, cond: Any = None, order: int = 4,
        final_order: int | None = None, gaussian_fit: str = "eps_ratio") -> Tensor:
    """Variable-step Adams-Bashforth in sigma~ (linear multistep, order ``order``); the last
    step to sigma~ = 0 is taken the same way, of order ``final_order`` (default: ``order``;
    1 returns x0_hat)."""
    ts, rising = check_ode_grid(ts, denoiser.process)
    st = _sigma_tilde(denoiser.process, ts)
    weights = []
    for i in range(len(ts) - (1 if rising else 2)):
        h = st[i + 1] - st[i]
        nodes = [st[i - j] - st[i] for j in range(min(order, i + 1))]
        weights.append([h * w for w in lagrange_weights(nodes, h, 0.0)])
    final_order = order if final_order is None else final_order
    if final_order > 1 and not rising:
        weights += final_weights(st, final_order)
    return _ab_in_sigma(denoiser, x, ts, callback, cond, weights, rising, final_order == 0,
                        two_point=two_point_fit(gaussian_fit))


__all__ = ["lms", "plms"]
