"""Deterministic inversion x0 -> x_T and reconstruction x_T -> x0 through the probability-flow
ODE, with DDIM (Euler), Heun or adaptive RK45 run backwards on the sampling grid.

In the EDM variables y = x / alpha and s = sigma / alpha (Karras et al. 2022, eq. 4) the
probability-flow ODE of every VP process is dy/ds = eps_hat(alpha y, t(s)); sampling integrates
it from s_max down to 0, inversion from 0 up to s_max. DDIM is Euler's method in these
variables (Song et al. 2021, eq. 14), Heun the EDM second-order method (Karras et al., Alg. 1).

The first inversion step leaves clean data (s = 0), where the network is never evaluated: it
is the explicit mirror of the samplers' final denoising step, with eps_hat taken at the
destination time t_1 (as in Mokady et al. 2023):
y_1 = x0 + s_1 eps_hat(x0, t_1). Reconstruction with the matching sampler (``ddim``,
``heun`` or ``rk45`` on the same grid) then returns the input to within the solver's error,
which shrinks at the solver's order (1, 2, tolerance) as the grid is refined.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..parameterization import DenoiserFn, Prediction
from ..samplers import get_sampler
from ..samplers.base import Callback, check_grid, report

Method = Literal["ddim", "heun", "rk45"]
METHODS: tuple[str, ...] = ("ddim", "heun", "rk45")


def _step_up(denoiser: DenoiserFn, y: Tensor, t: Tensor, a: list[float], st: list[float],
             k: int, cond: Any, heun: bool) -> tuple[Tensor, Prediction]:
    """One Euler (DDIM) or EDM Heun step from grid point k to k + 1 (s increasing)."""
    pred = denoiser(a[k] * y, t[k], cond)
    y_euler = y + (st[k + 1] - st[k]) * pred.eps
    if not heun:
        return y_euler, pred
    d2 = denoiser(a[k + 1] * y_euler, t[k + 1], cond).eps
    return y + (st[k + 1] - st[k]) * 0.5 * (pred.eps + d2), pred


def _rk45_up(denoiser: DenoiserFn, y: Tensor, t_from: Tensor, t_to: Tensor, cond: Any,
             rtol: float, atol: float) -> Tensor:
    """Adaptive Dormand-Prince (scipy) on dy/du = e^u eps_hat, u = log s, from t_from to t_to."""
    from scipy.integrate import solve_ivp

    process, shape, dtype = denoiser.process, y.shape, y.dtype
    u0, u1 = (-0.5 * process.log_snr(torch.stack([t_from, t_to]))).tolist()

    def rhs(u: float, y_flat: np.ndarray) -> np.ndarray:
        t = process.t_from_log_snr(torch.tensor(-2.0 * u, dtype=torch.float64))
        yy = torch.from_numpy(y_flat).reshape(shape).to(dtype=dtype, device=y.device)
        eps = denoiser(float(process.alpha(t)) * yy, t, cond).eps
        return (math.exp(u) * eps).double().flatten().cpu().numpy()

    sol = solve_ivp(rhs, (u0, u1), y.double().flatten().cpu().numpy(), method="RK45",
                    rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"rk45 inversion failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape).to(dtype=dtype, device=y.device)


@torch.no_grad()
def ode_invert(denoiser: DenoiserFn, x0: Tensor, ts: Tensor, method: Method = "ddim",
               callback: Callback | None = None, *, cond: Any = None, rtol: float = 1e-5,
               atol: float = 1e-5) -> Tensor:
    """Map data x0 (at ts[-1]) to noise at ts[0], walking the sampling grid ``ts`` upwards
    with ``method``; invert with the sampler of the same name on the same grid."""
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose from {METHODS}")
    t = check_grid(ts).flip(0)
    a_t, s_t = denoiser.process.alpha_sigma(t)
    a, st = a_t.tolist(), (s_t / a_t).tolist()
    pred = denoiser(x0, t[1], cond)  # first step: eps at the destination time
    y = x0 / a[0] + (st[1] - st[0]) * pred.eps
    report(callback, 0, t[1], a[1] * y, pred)
    if method == "rk45" and len(t) > 2:
        y = _rk45_up(denoiser, y, t[1], t[-1], cond, rtol, atol)
        return a[-1] * y
    for k in range(1, len(t) - 1):
        y, pred = _step_up(denoiser, y, t, a, st, k, cond, heun=method == "heun")
        report(callback, k, t[k], a[k + 1] * y, pred)
    return a[-1] * y


def ddim_invert(denoiser: DenoiserFn, x0: Tensor, ts: Tensor, callback: Callback | None = None,
                *, cond: Any = None) -> Tensor:
    """DDIM inversion: ``ode_invert`` with Euler steps (the inverse of ``ddim``, eta = 0)."""
    return ode_invert(denoiser, x0, ts, "ddim", callback, cond=cond)


def reconstruct(denoiser: DenoiserFn, x_T: Tensor, ts: Tensor, method: Method = "ddim", *,
                cond: Any = None, **options: Any) -> Tensor:
    """Run the sampler named ``method`` (eta = 0 / no churn) from x_T down the grid."""
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose from {METHODS}")
    return get_sampler(method)(denoiser, x_T, ts, cond=cond, **options)
