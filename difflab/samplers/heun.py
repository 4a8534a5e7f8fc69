"""Euler's and Heun's methods in the EDM variables (Karras et al. 2022, Alg. 1-2).

With y = x / alpha and sigma~ = sigma / alpha = exp(-lambda / 2) every VP process has the
probability-flow ODE dy / dsigma~ = (y - D(y)) / sigma~ = eps_hat (Karras et al. eq. 4 with
s(t) = alpha). Churn (Alg. 2, lines 4-6) raises sigma~ to sigma~ (1 + gamma) by adding fresh
noise before each step; gamma = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax].
The step to the last grid point returns x0_hat (the Euler step to sigma~ = 0, Alg. 2 line 8).

``euler`` is the first-order method in the same variables, the "Euler" of k-diffusion and of
diffusers' EulerDiscreteScheduler; ``sde.euler_ode`` is Euler in log-SNR instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn, Prediction
from .base import (
    Callback,
    Generators,
    check_ode_grid,
    final_step,
    randn_like,
    report,
    steep_noisy_end,
    two_point_fit,
    zero_snr_start,
)
from .options import SamplerOption, declare_options, final_order_option, gaussian_fit_option


def _churn_plan(process, ts: Tensor, churn: float, s_tmin: float, s_tmax: float
                ) -> tuple[list[float], Tensor]:
    """Raised sigma~ per step and the times they correspond to. sigma~ is sigma / alpha as
    ``heun`` computes it, so without churn sigma~_hat = sigma~ exactly (exp(-lambda / 2) can
    round an ulp above it, which drew a spurious ~1e-6 churn noise)."""
    a, s = process.alpha_sigma(ts)
    st = s / a
    n = len(ts) - 1
    gamma = torch.where((st >= s_tmin) & (st <= s_tmax),
                        torch.full_like(st, min(churn / n, math.sqrt(2) - 1)),
                        torch.zeros_like(st)) if churn > 0 else torch.zeros_like(st)
    st_hat = st * (1 + gamma)
    t_hat = torch.where(gamma > 0, process.t_from_log_snr(-2 * st_hat.log()), ts)
    return st_hat.tolist(), t_hat


def heun_update(denoiser: DenoiserFn, y: Tensor, pred: Prediction, dt: float, a_next: float,
                t_next: Tensor | float, cond: Any) -> Tensor:
    """Alg. 2 lines 8-11: from y = x / alpha, whose eps_hat at the step's start is
    ``pred.eps``, the Euler step of ``dt`` in sigma~, then the trapezoidal correction with
    eps_hat at its end (time ``t_next``, alpha ``a_next``): one evaluation, order 2."""
    y_euler = y + dt * pred.eps                                       # line 8
    pred2 = denoiser(a_next * y_euler, t_next, cond)                  # line 10
    return y + dt * 0.5 * (pred.eps + pred2.eps)                      # line 11


#: ``heun_pass``'s hook after a step lands on a grid point: (index of that point, y there)
#: -> y to continue from (``restart`` re-noises and re-integrates there).
GridHook = Callable[[int, Tensor], Tensor]


@declare_options()
@zero_snr_start
@torch.no_grad()
def euler(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
          callback: Callback | None = None, *, cond: Any = None) -> Tensor:
    """Euler's method in sigma~ on the PF ODE in the variance-exploding variable y = x / alpha
    (Karras et al. 2022, Alg. 1 / eq. 4): y <- y + (sigma~_{i+1} - sigma~_i) d with
    d = (y - x0_hat) / sigma~_i. Order 1. This is the "Euler" of k-diffusion and of diffusers'
    EulerDiscreteScheduler; with d = eps_hat its step lands on alpha x0_hat + sigma eps_hat, so
    on the same grid it equals DDIM (eta = 0; Song et al. 2021, Sec. 4.3) up to rounding. It
    is not ``euler_ode`` (Euler in log-SNR, a different first-order method).
    A rising grid runs the same steps upwards (inversion) and returns x at ts[-1]."""
    ts, rising = check_ode_grid(ts, denoiser.process)
    a, s = denoiser.process.alpha_sigma(ts)
    st, al = (s / a).tolist(), a.tolist()
    y = x / al[0]
    for i in range(len(ts) - 1):
        pred = denoiser(al[i] * y, ts[i], cond)
        if i == len(ts) - 2 and not rising:
            return final_step(callback, i, ts[i], pred)
        d = (y - pred.x0) / st[i]                       # dy / dsigma~ (Alg. 1, line 4)
        y = y + (st[i + 1] - st[i]) * d                 # Alg. 1, line 5
        report(callback, i, ts[i], al[i + 1] * y, pred)
    return al[-1] * y


@declare_options(
    SamplerOption("churn", float, 0.0, "S_churn: total noise added (gamma = min(S_churn / N, "
                  "sqrt(2) - 1) per step); 0 is the deterministic ODE sampler", min=0.0),
    SamplerOption("s_tmin", float, 0.0, "churn only where sigma~ >= S_tmin", min=0.0),
    SamplerOption("s_tmax", float, math.inf, "churn only where sigma~ <= S_tmax", min=0.0),
    SamplerOption("s_noise", float, 1.0, "S_noise: scale of the churn noise", min=0.0),
    final_order_option(1), gaussian_fit_option())
@zero_snr_start
@torch.no_grad()
def heun(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None, churn: float = 0.0,
         s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
         final_order: int = 1, gaussian_fit: str = "eps_ratio") -> Tensor:
    """EDM Heun sampler (Karras et al. 2022, Alg. 2): 2 evaluations per step, order 2;
    ``churn`` > 0 makes it stochastic. Without churn a rising grid runs the same steps upwards
    (inversion) and returns x at ts[-1]. Where sigma~ falls more than ``STEEP_START_RATIO``-fold
    over the noisiest interval (the discrete cosine schedule's t = T) that interval is the
    Euler (DDIM) step alone. The last step to sigma~ = 0 returns x0_hat (EDM's Euler step,
    ``final_order=1``); ``final_order`` k > 1 takes it by Adams-Bashforth in sigma~ through
    eps_hat at the latest k grid points, 0 by the local-Gaussian step on the latest two, fitted
    as ``gaussian_fit`` says (``base.final_step``; no extra evaluation either way)."""
    return heun_pass(denoiser, x, ts, generator, callback, cond, churn, s_tmin, s_tmax, s_noise,
                     final_order=final_order, two_point=two_point_fit(gaussian_fit))


def heun_pass(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators,
              callback: Callback | None, cond: Any, churn: float = 0.0, s_tmin: float = 0.0,
              s_tmax: float = math.inf, s_noise: float = 1.0,
              at_grid: GridHook | None = None, final_order: int = 1,
              two_point: bool = False) -> Tensor:
    """The ``heun`` sampler's steps (no zero-SNR start, no gradient tracking: the caller's);
    ``at_grid(k, y)``, when given, runs after each step that lands on grid point k < N of a
    falling grid and returns the y to continue from. ``final_order``: as ``heun``'s, on
    eps_hat at the grid points (the evaluation that starts each step)."""
    ts, rising = check_ode_grid(ts, denoiser.process)
    if rising and churn > 0:
        raise ValueError("Heun on a rising (inversion) grid needs churn = 0")
    process = denoiser.process
    a, s = process.alpha_sigma(ts)
    st = (s / a).tolist()
    st_hat, t_hat = _churn_plan(process, ts, churn, s_tmin, s_tmax)
    a_hat = process.alpha(t_hat).tolist()
    al = a.tolist()
    y = x / al[0]
    # A steep noisiest interval (discrete cosine's last step, ``steep_noisy_end``) is taken by
    # the Euler step alone, which is the DDIM step there.
    euler_only = (len(ts) - 2 if rising else 0) if steep_noisy_end(process, ts) else -1
    eps_hist: list[Tensor] = []  # eps_hat at the grid points so far, newest first
    x0_prev = None  # x0_hat at the previous grid point (the local Gaussian's two_point fit)
    for i in range(len(ts) - 1):
        # Alg. 2 line 6: y_hat = y + sqrt(s_hat^2 - s^2) eps (only with churn: st_hat and st
        # are computed two ways and may differ by rounding, which must not add noise)
        if churn > 0 and st_hat[i] > st[i]:
            y = y + s_noise * math.sqrt(st_hat[i] ** 2 - st[i] ** 2) * randn_like(y, generator)
        pred = denoiser(a_hat[i] * y, t_hat[i], cond)
        eps_hist = [pred.eps, *eps_hist][:final_order or 2]
        if i == len(ts) - 2 and not rising:  # one eps_hat (final_order 1): x0_hat
            return final_step(callback, i, ts[i], pred, a_hat[i] * y, a_hat[i], st_hat,
                              eps_hist, gaussian=final_order == 0,
                              x0_prev=x0_prev if two_point else None)
        x0_prev = pred.x0
        dt = st[i + 1] - st_hat[i]
        if i == euler_only:
            y = y + dt * pred.eps
        else:
            y = heun_update(denoiser, y, pred, dt, al[i + 1], ts[i + 1], cond)
        report(callback, i, ts[i], al[i + 1] * y, pred)
        if at_grid is not None and not rising:
            y = at_grid(i + 1, y)
    return al[-1] * y


__all__ = ["euler", "heun", "heun_pass", "heun_update"]
