"""DDPM ancestral sampling and DDIM, on any grid of any VP process.

Both step from t to s < t through the posterior of the forward process. With
alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2:

  q(x_s | x_t, x0) = N(mu, beta_tilde),
  mu = alpha_s sigma_{t|s}^2 / sigma_t^2 * x0 + alpha_{t|s} sigma_s^2 / sigma_t^2 * x_t,
  beta_tilde = sigma_{t|s}^2 sigma_s^2 / sigma_t^2                (Ho et al. 2020, eq. 6-7)

On a respaced grid, sigma_{t|s}^2 = 1 - alpha_bar_t / alpha_bar_s is the respaced beta_t.
A learned-variance model (``Prediction.var_frac`` = v) is sampled with
Sigma_theta = exp(v log beta + (1 - v) log beta_tilde) of the grid's own (strided) beta and
beta_tilde, as Nichol & Dhariwal 2021 (sec. 4) do for few-step sampling.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..parameterization import DenoiserFn, Prediction
from ..process import Process
from .base import Callback, Generators, check_grid, check_ode_grid, randn_like, report
from .grids import noisy_end_grid
from .options import SamplerOption, declare_options


def posterior_step(pred: Prediction, x: Tensor, alpha_s: Tensor, sigma_s: Tensor, c2: Tensor,
                   noise_var: Tensor, generator: Generators) -> Tensor:
    """x_s = alpha_s x0 + sqrt(sigma_s^2 - c2) eps + sqrt(noise_var) z (Song et al. 2021,
    eq. 12). c2 = noise_var = 0: DDIM; c2 = noise_var = beta_tilde: DDPM's posterior."""
    x = alpha_s * pred.x0 + (sigma_s**2 - c2).clamp(min=0).sqrt() * pred.eps
    if noise_var > 0:
        x = x + noise_var.sqrt().to(x.dtype) * randn_like(x, generator)
    return x


def posterior_variances(process: Process, ts: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """alpha and sigma on the whole grid (computed once), and per step the posterior variances
    beta = sigma_{t|s}^2 and beta_tilde = sigma_{t|s}^2 sigma_s^2 / sigma_t^2."""
    a, s = process.alpha_sigma(ts)
    beta = (s[:-1] ** 2 - (a[:-1] / a[1:]) ** 2 * s[1:] ** 2).clamp(min=0)
    return a, s, beta, beta * s[1:] ** 2 / s[:-1] ** 2


def _posterior_steps(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators,
                     callback: Callback | None, cond: Any, a: Tensor, sig: Tensor,
                     c2: Tensor, noise_var: Tensor,
                     learned: tuple[Tensor, Tensor] | None = None, rising: bool = False
                     ) -> Tensor:
    """x_s = alpha_s x0 + sqrt(sigma_s^2 - c2) eps + sqrt(noise_var) z for each step (the
    generalised DDIM update, Song et al. 2021 eq. 12); the last step returns x0, except on a
    rising grid (inversion), where every step is the update. With ``learned`` = (beta,
    beta_tilde) per step, a prediction carrying ``var_frac`` draws its noise from Sigma_theta
    instead of ``noise_var``."""
    for i in range(len(ts) - 1):
        pred = denoiser(x, ts[i], cond)
        if i == len(ts) - 2 and not rising:
            x = pred.x0
        elif learned is not None and pred.var_frac is not None:
            x = posterior_step(pred, x, a[i + 1], sig[i + 1], c2[i], torch.zeros(()), generator)
            v = pred.var_frac.to(x.dtype)
            log_var = (v * learned[0][i].clamp(min=1e-20).log()
                       + (1 - v) * learned[1][i].clamp(min=1e-20).log())
            x = x + (0.5 * log_var).exp() * randn_like(x, generator)
        else:
            x = posterior_step(pred, x, a[i + 1], sig[i + 1], c2[i], noise_var[i], generator)
        report(callback, i, ts[i], x, pred)
    return x


@declare_options(SamplerOption(
    "variance", str, "auto", "reverse variance: beta, beta_tilde, or auto (the learned "
    "Sigma_theta of a learned-variance model, else beta_tilde)",
    choices=("auto", "beta", "beta_tilde")))
@torch.no_grad()
def ddpm(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None,
         variance: Literal["auto", "beta", "beta_tilde"] = "auto") -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with sigma_t^2 = beta_t or
    beta_tilde_t; on a respaced grid beta_t is the respaced one (Nichol & Dhariwal 2021).
    ``auto``: the learned Sigma_theta of a learned-variance model, else beta_tilde.

    The mean is the posterior mean mu(x_t, x0_hat), which is DDIM's update with c2 = beta_tilde.
    """
    if variance not in ("auto", "beta", "beta_tilde"):
        raise ValueError(f"variance must be 'auto', 'beta' or 'beta_tilde', got {variance!r}")
    ts = check_grid(ts)
    a, sig, beta, beta_tilde = posterior_variances(denoiser.process, ts)
    noise_var = beta if variance == "beta" else beta_tilde
    learned = (beta, beta_tilde) if variance == "auto" else None
    return _posterior_steps(denoiser, x, ts, generator, callback, cond, a, sig, beta_tilde,
                            noise_var, learned)


@declare_options(
    SamplerOption("eta", float, 0.0, "stochasticity: noise c^2 = eta^2 beta_tilde per step "
                  "(0: the deterministic ODE sampler, 1: DDPM with beta_tilde)", min=0.0),
    SamplerOption("noisy_end", bool, False, "end at a noisy level and return x there, not "
                  "x0_hat: the grid's last time or, where that is sigma = 0, the process's first "
                  "level (where diffusers' DDIM lands when its step count does not divide T)"))
@torch.no_grad()
def ddim(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
         callback: Callback | None = None, *, cond: Any = None, eta: float = 0.0,
         noisy_end: bool = False) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with
    c^2 = eta^2 beta_tilde; eta = 0 is deterministic, eta = 1 is DDPM with beta_tilde.
    With eta = 0 a rising grid runs the same update upwards: DDIM inversion (Song et al. 2021,
    Sec. 4.3; Dhariwal & Nichol 2021, eq. 55), returning x at ts[-1].

    ``noisy_end`` (off by default): the last step is the update to the grid's last noisy level
    (``grids.noisy_end_grid``: a grid ending at sigma = 0 ends at the process's first level
    instead) and x there is returned (still holding that level's noise). diffusers' DDIMScheduler
    steps from timestep k to k - T // n, so when n does not divide T its last step lands on
    alpha_bar_0, the table's first level, rather than on alpha = 1."""
    ts, rising = check_ode_grid(ts, denoiser.process)
    if rising and eta != 0:
        raise ValueError("DDIM on a rising (inversion) grid needs eta = 0")
    if noisy_end and not rising:
        ts = noisy_end_grid(denoiser.process, ts)
    a, sig, _, beta_tilde = posterior_variances(denoiser.process, ts)
    c2 = eta**2 * beta_tilde
    return _posterior_steps(denoiser, x, ts, generator, callback, cond, a, sig, c2, c2,
                            rising=rising or noisy_end)


__all__ = ["ddim", "ddpm", "posterior_step", "posterior_variances"]
