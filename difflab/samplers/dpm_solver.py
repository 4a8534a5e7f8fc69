"""DPM-Solver (singlestep, orders 1-3) and DPM-Solver++ (2M, 3M, SDE): exponential integrators
in lambda = log(alpha / sigma), half the log-SNR (Lu et al. 2022, "DPM-Solver", Alg. 1-2;
Lu et al. 2022b, "DPM-Solver++", Alg. 2 and Sec. 5 for the SDE variant).

Every step uses the exact solution of the linear part of the ODE in lambda; only the model
output is approximated, by a polynomial in lambda through the latest evaluations (multistep)
or through intermediate stages (singlestep). Coefficients depend only on the grid and are
computed once per call. The last step returns x0_hat like every sampler (``base.final_step``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from .base import Callback, Generators, check_grid, final_step, randn_like, report
from .expint import half_log_snr_grid, lagrange_weights


def _multistep_plan(lam: Tensor, a: Tensor, s: Tensor, order: int, c: float
                    ) -> list[tuple[float, list[float]]]:
    """Per step i < N-1: (coefficient of x_i, weights on D_i, D_{i-1}, ...) of
    x_{i+1} = cx x_i + sum_j w_j D_{i-j} with kernel rate c (1: ODE, 2: SDE)."""
    plan = []
    for i in range(len(lam) - 2):
        h = float(lam[i + 1] - lam[i])
        k = min(order, i + 1)
        nodes = [float(lam[i - j] - lam[i]) for j in range(k)]
        w = lagrange_weights(nodes, h, c)
        scale = c * float(a[i + 1]) * h
        cx = float(s[i + 1] / s[i]) * math.exp(-(c - 1) * h)
        plan.append((cx, [scale * wj for wj in w]))
    return plan


@torch.no_grad()
def _dpmpp_multistep(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators,
                     callback: Callback | None, cond: Any, order: int, sde: bool,
                     final_order: int = 1) -> Tensor:
    ts = check_grid(ts)
    lam, a, s = half_log_snr_grid(denoiser.process, ts)
    c = 2.0 if sde else 1.0
    plan = _multistep_plan(lam, a, s, order, c)
    history: list[Tensor] = []
    eps_hist: list[Tensor] = []
    for i in range(len(ts) - 1):
        pred = denoiser(x, ts[i], cond)
        eps_hist = [pred.eps, *eps_hist][:final_order]
        if i == len(ts) - 2:
            return final_step(callback, i, ts[i], pred, x, float(a[i]), (-lam).exp().tolist(),
                              eps_hist)
        history = [pred.x0, *history][:order]
        cx, w = plan[i]
        x_new = cx * x
        for wj, dj in zip(w, history, strict=False):
            x_new = x_new + wj * dj
        if sde:  # sigma_{i+1} sqrt(1 - e^{-2h}) z  (DPM-Solver++ SDE, Lu et al. 2022b eq. 18)
            h = float(lam[i + 1] - lam[i])
            x_new = x_new + float(s[i + 1]) * math.sqrt(-math.expm1(-2 * h)) * randn_like(
                x, generator)
        x = x_new
        report(callback, i, ts[i], x, pred)
    return x


def dpmpp_2m(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
             callback: Callback | None = None, *, cond: Any = None, final_order: int = 1
             ) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), the linear interpolant of x0_hat in lambda
    integrated exactly (phi_2 form); first step first order. Order 2. ``final_order`` > 1
    replaces the last x0_hat step by an Adams-Bashforth step to sigma~ = 0 (``multistep``)."""
    return _dpmpp_multistep(denoiser, x, ts, generator, callback, cond, 2, False, final_order)


def dpmpp_3m(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
             callback: Callback | None = None, *, cond: Any = None, final_order: int = 1
             ) -> Tensor:
    """DPM-Solver++(3M): quadratic interpolant through three x0_hat, integrated exactly
    (Lu et al. 2022b, Appendix; phi_3 form). Order 3. ``final_order`` as in ``dpmpp_2m``."""
    return _dpmpp_multistep(denoiser, x, ts, generator, callback, cond, 3, False, final_order)


def dpmpp_sde(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
              callback: Callback | None = None, *, cond: Any = None, order: int = 2) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, Sec. 5): the reverse SDE's linear part and noise
    exactly, x0_hat by its linear interpolant in lambda under the kernel 2 e^{-2(h-u)}."""
    return _dpmpp_multistep(denoiser, x, ts, generator, callback, cond, order, sde=True)


def _singlestep_plan(denoiser: DenoiserFn, lam: Tensor, order: int
                     ) -> list[tuple[float, list[float], list[tuple[Tensor, float, float]]]]:
    """Per step: h, the stage fractions r (at lambda_i + r h) and each stage's (t, alpha, sigma).
    """
    process = denoiser.process
    rs = {1: [], 2: [0.5], 3: [1 / 3, 2 / 3]}[order]
    plan = []
    for i in range(len(lam) - 2):
        h = float(lam[i + 1] - lam[i])
        lam_stage = torch.tensor([float(lam[i]) + r * h for r in rs], dtype=torch.float64)
        t_stage = process.t_from_log_snr(2 * lam_stage) if rs else lam_stage
        a, s = process.alpha_sigma(t_stage)
        plan.append((h, rs, [(t_stage[j], float(a[j]), float(s[j])) for j in range(len(rs))]))
    return plan


@torch.no_grad()
def dpm_solver(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
               callback: Callback | None = None, *, cond: Any = None, order: int = 3
               ) -> Tensor:
    """Singlestep DPM-Solver-1/2/3 with noise prediction (Lu et al. 2022, eq. 3.7 and
    Alg. 1-2, r1 = 1/2 for order 2 and r1 = 1/3, r2 = 2/3 for order 3). Each step uses
    ``order`` evaluations; DPM-Solver-1 is DDIM."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    ts = check_grid(ts)
    lam, a, s = half_log_snr_grid(denoiser.process, ts)
    plan = _singlestep_plan(denoiser, lam, order)
    for i in range(len(ts) - 1):
        pred = denoiser(x, ts[i], cond)
        if i == len(ts) - 2:
            return final_step(callback, i, ts[i], pred)
        h, rs, stages = plan[i]
        a0, a1, s1 = float(a[i]), float(a[i + 1]), float(s[i + 1])
        e0 = pred.eps
        # eq. 3.7, first-order part: alpha_t/alpha_s x - sigma_t (e^h - 1) eps
        x_new = (a1 / a0) * x - s1 * math.expm1(h) * e0
        if order == 2:
            tm, am, sm = stages[0]
            u = (am / a0) * x - sm * math.expm1(rs[0] * h) * e0
            d = denoiser(u, tm, cond).eps - e0
            x_new = x_new - s1 / (2 * rs[0]) * math.expm1(h) * d
        elif order == 3:
            x_new = _dpm3_correction(denoiser, x, x_new, e0, h, rs, stages, a0, s1, cond)
        x = x_new
        report(callback, i, ts[i], x, pred)
    return x


def _dpm3_correction(denoiser: DenoiserFn, x: Tensor, x1: Tensor, e0: Tensor, h: float,
                     rs: list[float], stages: list[tuple[Tensor, float, float]], a0: float,
                     s1: float, cond: Any) -> Tensor:
    """The two extra stages of DPM-Solver-3 (Lu et al. 2022, Alg. 2)."""
    r1, r2 = rs
    (t1, am1, sm1), (t2, am2, sm2) = stages
    u1 = (am1 / a0) * x - sm1 * math.expm1(r1 * h) * e0
    d1 = denoiser(u1, t1, cond).eps - e0
    phi2_r2 = math.expm1(r2 * h) / (r2 * h) - 1  # = r2 h phi_2(r2 h)
    u2 = (am2 / a0) * x - sm2 * math.expm1(r2 * h) * e0 - sm2 * (r2 / r1) * phi2_r2 * d1
    d2 = denoiser(u2, t2, cond).eps - e0
    return x1 - s1 / r2 * (math.expm1(h) / h - 1) * d2


__all__ = ["dpm_solver", "dpmpp_2m", "dpmpp_3m", "dpmpp_sde"]
