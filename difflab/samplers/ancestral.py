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


def _rates(denoiser: DenoiserFn, ts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """alpha and sigma on the whole grid (computed once), and sigma_{t|s}^2 per step."""
    a, s = denoiser.process.alpha_sigma(ts)
    var_ts = (s[:-1] ** 2 - (a[:-1] / a[1:]) ** 2 * s[1:] ** 2).clamp(min=0)
    return a, s, var_ts


@torch.no_grad()
def ddpm(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None,
         variance: Literal["beta", "beta_tilde"] = "beta_tilde") -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with sigma_t^2 = beta_t or
    beta_tilde_t; on a respaced grid beta_t is the respaced one (Nichol & Dhariwal 2021)."""
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    ts = check_grid(ts)
    a, sig, var_ts = _rates(denoiser, ts)
    for i in range(len(ts) - 1):
        t = ts[i]
        pred = denoiser(x, t, cond)
        if i == len(ts) - 2:
            x = pred.x0
        else:
            a_t, s_t, a_s, s_s, v = a[i], sig[i], a[i + 1], sig[i + 1], var_ts[i]
            mean = (a_s * v / s_t**2) * pred.x0 + (a_t / a_s * s_s**2 / s_t**2) * x
            var = v * s_s**2 / s_t**2 if variance == "beta_tilde" else v
            x = mean + var.sqrt().to(x.dtype) * randn_like(x, generator)
        report(callback, i, t, x, pred)
    return x


@torch.no_grad()
def ddim(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with
    c^2 = eta^2 beta_tilde; eta = 0 is deterministic, eta = 1 is DDPM with beta_tilde."""
    ts = check_grid(ts)
    a, sig, var_ts = _rates(denoiser, ts)
    for i in range(len(ts) - 1):
        t = ts[i]
        pred = denoiser(x, t, cond)
        if i == len(ts) - 2:
            x = pred.x0
        else:
            s_t, a_s, s_s = sig[i], a[i + 1], sig[i + 1]
            c2 = eta**2 * var_ts[i] * s_s**2 / s_t**2
            x = a_s * pred.x0 + (s_s**2 - c2).clamp(min=0).sqrt() * pred.eps
            if eta > 0:
                x = x + c2.sqrt().to(x.dtype) * randn_like(x, generator)
        report(callback, i, t, x, pred)
    return x


__all__ = ["ddim", "ddpm"]
