"""Consistency sampling (Song et al. 2023, Algorithm 1) and the one-step ODE solvers that
consistency distillation takes its targets from.

A consistency model maps any point of a probability-flow ODE trajectory to its origin,
f(x_t, t) ~ x_0 (``parameterization``, prediction ``consistency``). Sampling with K steps on a
decreasing grid t_0 > t_1 > ... > t_K:

  x0 = f(x_{t_0}, t_0);  for k = 1..K-1:  x_{t_k} = alpha_k x0 + sigma_k z,  x0 = f(x_{t_k}, t_k)

with fresh z ~ N(0, I) from the generator (Algorithm 1 re-noises in the VE view, x~ = x0 +
sqrt(s_k^2 - s_min^2) z; ``sigma_min`` gives s_min, and 0 is the plain forward process). One
step is f(x_T, T). The last grid time only ends the grid; it is never evaluated.

The grid is the pipeline's usual one, so it follows from the number of steps alone: for a
discrete process ``trailing`` (t_k = T (K - k) / K), for a continuous one ``uniform``. On the
cosine schedule with T = 1000 two steps evaluate at t = 1000 and t = 500, where s = sigma /
alpha = 1.01, close to the hand-picked midpoint 0.821 of Song et al. (CIFAR-10, s_max = 80);
four steps at s = 2.4, 1.0 and 0.42. ``--spacing``/``--grid`` replace it as for any sampler.

``ode_step`` is one step of a teacher's ODE solver from per-example times t to s < t (DDIM,
Heun, DPM-Solver-2): the same maths as the samplers ``ddim``, ``heun`` and ``dpm_solver``
(order 2), for a batch whose examples each have their own pair of times.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from ..process import expand_like
from .ancestral import posterior_step
from .base import Callback, Generators, check_grid, final_step, randn_like, report
from .options import SamplerOption, declare_options

OdeSolver = Literal["ddim", "heun", "dpm_solver"]
ODE_SOLVERS: tuple[str, ...] = ("ddim", "heun", "dpm_solver")


@declare_options(SamplerOption(
    "sigma_min", float, 0.0, "noise level s_min (sigma / alpha) the denoised sample is taken "
    "to carry: re-noising adds sqrt(s^2 - s_min^2) (Song et al. 2023, Alg. 1); 0: the "
    "forward process", min=0.0))
@torch.no_grad()
def consistency(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
                callback: Callback | None = None, *, cond: Any = None,
                sigma_min: float = 0.0) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): denoise at ts[0],
    then for each further grid time but the last re-noise the estimate to it with fresh noise
    and denoise again. One step (a 2-point grid) is f(x_T, T)."""
    ts = check_grid(ts)
    process = denoiser.process
    for i in range(len(ts) - 1):
        pred = denoiser(x, ts[i], cond)
        if i == len(ts) - 2:
            return final_step(callback, i, ts[i], pred)
        a, s = (float(v) for v in process.alpha_sigma(ts[i + 1]))
        noise = max(s**2 - (a * sigma_min) ** 2, 0.0) ** 0.5  # alpha sqrt(s~^2 - s_min^2)
        x = a * pred.x0 + noise * randn_like(pred.x0, generator)
        report(callback, i, ts[i], x, pred)
    raise AssertionError("unreachable: check_grid gives at least 2 times")


def ode_step(denoiser: DenoiserFn, x: Tensor, t: Tensor, s: Tensor,
             solver: OdeSolver = "heun", cond: Any = None) -> Tensor:
    """One probability-flow ODE step of ``solver`` from x at times t [B] to times s [B]
    (s < t, both noisy, alpha > 0), each example with its own pair:

    - ``ddim``: x_s = alpha_s x0_hat + sigma_s eps_hat (Song et al. 2021, eq. 12 with eta = 0;
      the Euler step in lambda, DPM-Solver-1), 1 evaluation;
    - ``heun``: Euler in y = x / alpha against sigma~ = sigma / alpha, then the trapezoidal
      correction (Karras et al. 2022, Alg. 2 without churn), 2 evaluations;
    - ``dpm_solver``: singlestep DPM-Solver-2 with its intermediate time at the log-SNR
      midpoint (Lu et al. 2022, eq. 3.6 via the Lagrange weights of ``expint``), 2 evaluations.
    """
    process = denoiser.process
    a_t, sig_t = process.alpha_sigma(t)
    a_s, sig_s = process.alpha_sigma(s)
    pred = denoiser(x, t, cond)
    if solver == "ddim":
        return posterior_step(pred, x, expand_like(a_s, x), expand_like(sig_s, x),
                              torch.zeros(()), torch.zeros(()), None)
    if solver == "heun":
        st_t, st_s = expand_like(sig_t / a_t, x), expand_like(sig_s / a_s, x)
        y = x / expand_like(a_t, x)
        dt = st_s - st_t
        y_euler = y + dt * pred.eps
        pred2 = denoiser(expand_like(a_s, x) * y_euler, s, cond)
        return expand_like(a_s, x) * (y + dt * 0.5 * (pred.eps + pred2.eps))
    if solver == "dpm_solver":
        return _dpm_solver_2(denoiser, x, t, s, pred.eps, cond)
    raise ValueError(f"unknown ODE solver {solver!r}; choose from {ODE_SOLVERS}")


def _dpm_solver_2(denoiser: DenoiserFn, x: Tensor, t: Tensor, s: Tensor, eps_t: Tensor,
                  cond: Any) -> Tensor:
    """DPM-Solver-2 in noise prediction: the stage at the lambda midpoint m by the order-1
    exponential integrator, then x_s = (a_s / a_t) x - sigma_s h (w0 eps_t + w1 eps_m), where
    (w0, w1) integrate the line through (0, eps_t), (r h, eps_m) against e^(h - u) exactly:
    w1 = phi_2(h) / r, w0 = phi_1(h) - w1 (``expint.lagrange_weights`` with c = -1)."""
    process = denoiser.process
    lam_t, lam_s = 0.5 * process.log_snr(t), 0.5 * process.log_snr(s)
    m = process.t_from_log_snr(lam_t + lam_s)  # log-SNR midpoint: lambda_m = (l_t + l_s) / 2
    lam_m = 0.5 * process.log_snr(m)
    a_t, a_m, a_s = process.alpha(t), process.alpha(m), process.alpha(s)
    sig_m, sig_s = process.sigma(m), process.sigma(s)
    h, h_m = lam_s - lam_t, lam_m - lam_t
    x_m = (expand_like(a_m / a_t, x) * x
           - expand_like(sig_m * h_m * torch.expm1(h_m) / h_m, x) * eps_t)
    eps_m = denoiser(x_m, m, cond).eps
    r = h_m / h
    phi1, phi2 = torch.expm1(h) / h, (torch.expm1(h) - h) / h**2
    w1 = phi2 / r
    w0 = phi1 - w1
    return (expand_like(a_s / a_t, x) * x
            - expand_like(sig_s * h * w0, x) * eps_t - expand_like(sig_s * h * w1, x) * eps_m)


__all__ = ["ODE_SOLVERS", "OdeSolver", "consistency", "ode_step"]
