"""DDPM ancestral sampling and DDIM, on any grid of any VP process.

Both step from t to s < t through the posterior of the forward process. With
alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2:

  q(x_s | x_t, x0) = N(mu, beta_tilde),
  mu = alpha_s sigma_{t|s}^2 / sigma_t^2 * x0 + alpha_{t|s} sigma_s^2 / sigma_t^2 * x_t,
  beta_tilde = sigma_{t|s}^2 sigma_s^2 / sigma_t^2                (Ho et al. 2020, eq. 6-7)

On a respaced grid, sigma_{t|s}^2 = 1 - alpha_bar_t / alpha_bar_s is the respaced beta_t.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from .base import Callback, Generators, check_grid, randn_like, report


def _rates(denoiser: DenoiserFn, t: Tensor, s: Tensor):
    a_t, s_t = denoiser.process.alpha_sigma(t)
    a_s, s_s = denoiser.process.alpha_sigma(s)
    var_ts = (s_t**2 - (a_t / a_s) ** 2 * s_s**2).clamp(min=0)  # sigma_{t|s}^2
    return a_t, s_t, a_s, s_s, var_ts


@torch.no_grad()
def ddpm(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None,
         variance: Literal["beta", "beta_tilde"] = "beta_tilde") -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with sigma_t^2 = beta_t or
    beta_tilde_t; on a respaced grid beta_t is the respaced one (Nichol & Dhariwal 2021)."""
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    ts = check_grid(ts)
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        pred = denoiser(x, t, cond)
        if i == len(ts) - 2:
            x = pred.x0
        else:
            a_t, s_t, a_s, s_s, var_ts = _rates(denoiser, t, s)
            mean = (a_s * var_ts / s_t**2) * pred.x0 + (a_t / a_s * s_s**2 / s_t**2) * x
            var = var_ts * s_s**2 / s_t**2 if variance == "beta_tilde" else var_ts
            x = mean + var.sqrt().to(x.dtype) * randn_like(x, generator)
        report(callback, i, t, x, pred)
    return x


@torch.no_grad()
def ddim(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with
    c^2 = eta^2 beta_tilde; eta = 0 is deterministic, eta = 1 is DDPM with beta_tilde."""
    ts = check_grid(ts)
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        pred = denoiser(x, t, cond)
        if i == len(ts) - 2:
            x = pred.x0
        else:
            _, s_t, a_s, s_s, var_ts = _rates(denoiser, t, s)
            c2 = eta**2 * var_ts * s_s**2 / s_t**2
            x = a_s * pred.x0 + (s_s**2 - c2).clamp(min=0).sqrt() * pred.eps
            if eta > 0:
                x = x + c2.sqrt().to(x.dtype) * randn_like(x, generator)
        report(callback, i, t, x, pred)
    return x


__all__ = ["ddim", "ddpm"]
