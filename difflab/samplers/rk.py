"""Adaptive Runge-Kutta on the probability-flow ODE (Dormand & Prince 1980, RK45, through
``scipy.integrate.solve_ivp``; Song et al. 2021 used the same solver for their "ODE" sampler).

The variables. With q = x / sigma and w = alpha / sigma = e^{lambda / 2} the PF ODE of any
process x_t = alpha x_0 + sigma eps is  dq / dw = x0_hat(sigma q, t(w))  (the data-prediction
form behind DPM-Solver++, Lu et al. 2022b, eq. 9: d(x/sigma) = x0_hat d(alpha/sigma)). Its
right-hand side is smooth and settles at both ends, at high noise (x0_hat tends to the data
mean) and at low noise (x0_hat tends to the clean point), where q is linear in w and every
Runge-Kutta step is exact: DDIM is Euler's method here. w spans decades (about 6e-3 to 1e2 for
DDPM's schedule), so the solver's time is v = asinh(w / w_c) (``snr_knee`` w_c): linear in w
at high noise, where x0_hat is close to constant and one step crosses a large range of w, and
logarithmic above w_c, where x0_hat converges to the data point at a rate set by the data's
scale. The EDM variables (y = x / alpha against log sigma~, rk45's earlier form) have the
exponential y ~ sigma~ eps_T at high noise instead, which RK45 must resolve with steps of
about one unit of log sigma~: on a 64-d anisotropic mixture (DDPM linear, 256 draws, to
sigma~ = 0.01) they took 57 NFE for RMS 0.14 at tolerance 1e-2 and 93 NFE for 2e-4 at 1e-4,
where these variables take 39 NFE for 4e-3 and 63 NFE for 2.4e-4, and 27 NFE for 0.11 at 0.1.

It runs from ts[0] to ts[-2]; the last step returns x0_hat there like every sampler. Read the
NFE with ``CountingDenoiser``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from .abm2 import abm2_solve
from .base import (
    Callback,
    Generators,
    StepInfo,
    check_ode_grid,
    final_step,
    zero_snr_start,
)
from .bs23 import bs23_solve
from .options import SamplerOption, declare_options


def _snr_sqrt(process, t: Tensor) -> float:
    """w = alpha / sigma at time t."""
    return math.exp(0.5 * float(process.log_snr(t)))


def _time_at(process, v: float, knee: float) -> tuple[Tensor, float]:
    """The process time and sigma at solver time v = asinh(w / knee)."""
    lam = 2.0 * math.log(knee * math.sinh(v))
    t = process.t_from_log_snr(torch.tensor(lam, dtype=torch.float64))
    return t, float(process.sigma(t))


@declare_options(
    SamplerOption("rtol", float, 1e-5, "relative tolerance of the adaptive step", min=0.0,
                  min_exclusive=True),
    SamplerOption("atol", float, 1e-5, "absolute tolerance of the adaptive step (on "
                  "x / sigma)", min=0.0, min_exclusive=True),
    SamplerOption("method", str, "RK45", "scipy.integrate.solve_ivp method; or, in torch, "
                  "ABM2: adaptive Adams predictor-corrector, 1 NFE a step, for budgets of "
                  "10-40 NFE; BS23: Bogacki-Shampine 3(2), 3 NFE a step",
                  choices=("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA", "ABM2", "BS23")),
    SamplerOption("snr_knee", float, 10.0, "w_c: the solver's time is asinh(w / w_c) of "
                  "w = alpha / sigma, linear below w_c and logarithmic above",
                  min=0.0, min_exclusive=True),
    SamplerOption("max_nfe", int, None, "methods ABM2 and BS23: cap on network evaluations; "
                  "the last affordable step goes to the end and is accepted", min=2))
@zero_snr_start
@torch.no_grad()
def rk45(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None, rtol: float = 1e-5,
         atol: float = 1e-5, method: str = "RK45", snr_knee: float = 10.0,
         max_nfe: int | None = None) -> Tensor:
    """Adaptive RK45 (or any ``solve_ivp`` method, e.g. "RK23" for the fewest evaluations at
    loose tolerances, "DOP853" for tight ones) on the PF ODE dq / dw = x0_hat in q = x / sigma,
    w = alpha / sigma, against asinh(w / ``snr_knee``) (module docstring). Only the first and
    the last two grid points are used. The callback sees every accepted step. On a rising grid
    (inversion) it integrates from ts[0] up to ts[-1] and returns x there.

    ``method="ABM2"`` (``samplers.abm2``) and ``"BS23"`` (``samplers.bs23``) run in torch on
    x's device, return the last evaluation's x0_hat (no extra one) and, with ``max_nfe``, end
    within that many NFE."""
    ts, rising = check_ode_grid(ts, denoiser.process)
    process = denoiser.process
    t0, t1 = ts[0], ts[-1] if rising else ts[-2]
    v0, v1 = (math.asinh(_snr_sqrt(process, t) / snr_knee) for t in (t0, t1))
    if max_nfe is not None and method not in _TORCH_METHODS:
        raise ValueError(f"rk45: option 'max_nfe' needs method ABM2 or BS23, got {method}")
    if method in _TORCH_METHODS:
        return _rk45_torch(denoiser, x, (t0, t1, v0, v1), rising, callback, cond, rtol, atol,
                           snr_knee, method, max_nfe)
    from scipy.integrate import solve_ivp

    shape, dtype, device = x.shape, x.dtype, x.device

    def as_tensor(q_flat: np.ndarray) -> Tensor:
        return torch.from_numpy(q_flat).reshape(shape).to(dtype=dtype, device=device)

    def rhs(v: float, q_flat: np.ndarray) -> np.ndarray:
        t, s = _time_at(process, v, snr_knee)
        x0 = denoiser(s * as_tensor(q_flat), t, cond).x0  # the ODE solver works on host memory
        return (snr_knee * math.cosh(v) * x0).double().flatten().cpu().numpy()

    q0 = (x / float(process.sigma(t0))).double().flatten().cpu().numpy()
    q_end = q0
    if v1 != v0:
        sol = solve_ivp(rhs, (v0, v1), q0, method=method, rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"rk45 failed: {sol.message}")
        q_end = sol.y[:, -1]
        if callback is not None:
            for k, v in enumerate(sol.t[1:]):
                t, s = _time_at(process, float(v), snr_knee)
                xk = s * as_tensor(sol.y[:, k + 1])
                callback(StepInfo(i=k, t=t, x=xk, x0=xk))
    x_end = float(process.sigma(t1)) * as_tensor(q_end)
    if rising:
        return x_end
    pred = denoiser(x_end, t1, cond)
    return final_step(callback, 0 if v1 == v0 else len(sol.t) - 1, t1, pred)


_TORCH_METHODS = ("ABM2", "BS23")


def _rk45_torch(denoiser: DenoiserFn, x: Tensor, span: tuple, rising: bool,
                callback: Callback | None, cond: Any, rtol: float, atol: float,
                snr_knee: float, method: str, max_nfe: int | None) -> Tensor:
    """rk45 with difflab's torch solvers on the same ODE (``samplers.abm2``, ``.bs23``)."""
    t0, t1, v0, v1 = span
    process, last = denoiser.process, {}
    work = torch.float64 if x.dtype == torch.float64 else torch.float32

    def x0_at(v: float, q: Tensor) -> Tensor:
        t, s = (t1, float(process.sigma(t1))) if v == v1 else _time_at(process, v, snr_knee)
        last["pred"] = denoiser((s * q).to(x.dtype), t, cond)
        return last["pred"].x0.to(work)

    steps = []

    def on_step(v: float, q: Tensor) -> None:
        if callback is not None:
            t, s = _time_at(process, v, snr_knee)
            xk = (s * q).to(x.dtype)
            callback(StepInfo(i=len(steps), t=t, x=xk, x0=xk))
        steps.append(v)

    q0 = x.to(work) / float(process.sigma(t0))
    opts = {"rtol": rtol, "atol": atol, "max_nfe": max_nfe, "on_step": on_step}
    if method == "ABM2":
        q_end, _ = abm2_solve(x0_at, v0, v1, q0, snr_knee, **opts)
    else:
        q_end, _, _ = bs23_solve(lambda v, q: snr_knee * math.cosh(v) * x0_at(v, q), v0, v1,
                                 q0, **opts)
    x_end = (float(process.sigma(t1)) * q_end).to(x.dtype)
    if rising:
        return x_end
    return final_step(callback, len(steps), t1, last["pred"])


__all__ = ["rk45"]
