"""Adaptive Runge-Kutta on the probability-flow ODE (Dormand & Prince 1980, RK45, through
``scipy.integrate.solve_ivp``; Song et al. 2021 used the same solver for their "ODE" sampler).

The ODE is integrated in the EDM variables y = x / alpha against u = log sigma~ = -lambda / 2:
dy / du = sigma~ eps_hat(alpha y, t(u)) (Karras et al. 2022, eq. 4 with d sigma~ = sigma~ du),
which is smooth and well scaled on the whole range. It runs from ts[0] to ts[-2]; the last
step returns x0_hat there like every sampler. Read the NFE with ``CountingDenoiser``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from .base import (
    Callback,
    Generators,
    StepInfo,
    check_ode_grid,
    final_step,
    zero_snr_start,
)
from .options import SamplerOption, declare_options


@declare_options(
    SamplerOption("rtol", float, 1e-5, "relative tolerance of the adaptive step", min=0.0,
                  min_exclusive=True),
    SamplerOption("atol", float, 1e-5, "absolute tolerance of the adaptive step", min=0.0,
                  min_exclusive=True),
    SamplerOption("method", str, "RK45", "scipy.integrate.solve_ivp method",
                  choices=("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")))
@zero_snr_start
@torch.no_grad()
def rk45(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None, rtol: float = 1e-5,
         atol: float = 1e-5, method: str = "RK45") -> Tensor:
    """Adaptive RK45 (or any ``solve_ivp`` method, e.g. "DOP853") on the PF ODE; only the first
    and the last two grid points are used. The callback sees every accepted step. On a rising
    grid (inversion) it integrates from ts[0] up to ts[-1] and returns x there."""
    from scipy.integrate import solve_ivp

    ts, rising = check_ode_grid(ts, denoiser.process)
    process = denoiser.process
    t0, t1 = ts[0], ts[-1] if rising else ts[-2]
    u0, u1 = (-0.5 * process.log_snr(torch.stack([t0, t1]))).tolist()
    a0 = float(process.alpha(t0))
    shape, dtype, device = x.shape, x.dtype, x.device

    def rhs(u: float, y_flat: np.ndarray) -> np.ndarray:
        t = process.t_from_log_snr(torch.tensor(-2.0 * u, dtype=torch.float64))
        a = float(process.alpha(t))
        y = torch.from_numpy(y_flat).reshape(shape).to(dtype=dtype, device=device)
        eps = denoiser(a * y, t, cond).eps  # the ODE solver works on host memory
        return (math.exp(u) * eps).double().flatten().cpu().numpy()

    y0 = (x / a0).double().flatten().cpu().numpy()
    sol = solve_ivp(rhs, (u0, u1), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"rk45 failed: {sol.message}")
    if callback is not None:
        for k, u in enumerate(sol.t[1:]):
            t = process.t_from_log_snr(torch.tensor(-2.0 * u, dtype=torch.float64))
            y = torch.from_numpy(sol.y[:, k + 1]).reshape(shape).to(dtype=dtype, device=device)
            xk = float(process.alpha(t)) * y
            callback(StepInfo(i=k, t=t, x=xk, x0=xk))
    y_end = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(dtype=dtype, device=device)
    if rising:
        return float(process.alpha(t1)) * y_end
    pred = denoiser(float(process.alpha(t1)) * y_end, t1, cond)
    return final_step(callback, len(sol.t) - 1, t1, pred)


__all__ = ["rk45"]
