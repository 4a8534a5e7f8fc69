"""Gaussian pieces of the variational bound: KL, decoders, the DDPM posterior and variances.

Pure functions of tensors and a discrete process (``betas``, ``alpha_bar``), shared by the
training losses (:mod:`difflab.objectives.vlb`) and the likelihood evaluator
(:mod:`difflab.evaluation.likelihood`); they import nothing above this layer.

q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde) with (Ho et al. 2020, eq. 6-7)
  mu_tilde = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t,
  beta_tilde = beta_t (1 - ab_{t-1}) / (1 - ab_t).
The model's reverse variance is beta_t or beta_tilde_t (for t = 1, where beta_tilde_1 = 0,
beta_tilde_2 is used: the "clipped" log variance of improved-diffusion), or learned between the
two (Nichol & Dhariwal 2021, eq. 15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

#: half the width of one 8-bit bin on the [-1, 1] scale (u / 127.5 - 1, u = 0..255).
HALF_BIN = 1.0 / 255.0

Variance = Literal["beta", "beta_tilde"]


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, e^logvar) per element (continuous decoder), in nats."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _log_cdf_diff(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails (float64)."""
    upper = lo > 0  # both in the upper tail: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    a = torch.where(upper, -hi, lo)
    b = torch.where(upper, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log1p(-torch.exp(torch.special.log_ndtr(a) - log_b).clamp(max=1 - 1e-15))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor,
                                        half_bin: float = HALF_BIN) -> Tensor:
    """log P(x) per element for x on the 8-bit grid of [-1, 1] under N(mean, e^(2 log_scale))
    integrated over x's bin [x - half_bin, x + half_bin]; the edge bins extend to -inf / +inf
    (Ho et al. 2020, eq. 13)."""
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv = torch.exp(-log_scale)
    lo = (x - half_bin - mean) * inv
    hi = (x + half_bin - mean) * inv
    lo = torch.where(x <= -1 + half_bin, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(x >= 1 - half_bin, torch.full_like(hi, math.inf), hi)
    return _log_cdf_diff(lo, hi)


@dataclass(frozen=True)
class Posterior:
    """Coefficients of q(x_{t-1} | x_t, x0) for integer t in 1..T (float64 tensors [B])."""

    coef_x0: Tensor
    coef_xt: Tensor
    var: Tensor        # beta_tilde_t
    beta: Tensor       # beta_t

    def mean(self, x0: Tensor, xt: Tensor) -> Tensor:
        c0 = self.coef_x0.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        ct = self.coef_xt.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return c0 * x0 + ct * xt


def posterior(process: Any, t: Tensor) -> Posterior:
    """q(x_{t-1} | x_t, x0) of a discrete process (``betas``, ``alpha_bar``) at steps t [B]."""
    if not getattr(process, "is_discrete", False) or not hasattr(process, "alpha_bar"):
        raise ValueError(f"the variational bound needs a discrete process with betas, got "
                         f"{process!r}; use the ODE likelihood (--method ode) instead")
    k = t.long() - 1
    ab = process.alpha_bar.to(t.device)
    ab_t = ab[k]
    ab_prev = torch.where(k > 0, ab[(k - 1).clamp(min=0)], torch.ones_like(ab_t))
    beta = process.betas.to(t.device)[k]
    return Posterior(coef_x0=ab_prev.sqrt() * beta / (1 - ab_t),
                     coef_xt=(1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t),
                     var=beta * (1 - ab_prev) / (1 - ab_t), beta=beta)


def model_log_variance(process: Any, t: Tensor, variance: Variance) -> Tensor:
    """log of the reverse variance at steps t [B]: beta_t, or beta_tilde_t with beta_tilde_1
    replaced by beta_tilde_2 (it is 0)."""
    if variance == "beta":
        return posterior(process, t).beta.log()
    if variance != "beta_tilde":
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    return posterior(process, t.clamp(min=2)).var.log()


def learned_log_variance(process: Any, t: Tensor, var_frac: Tensor) -> Tensor:
    """log Sigma_theta = v log beta_t + (1 - v) log beta_tilde_t per element, for v = ``var_frac``
    in [0, 1] [B, ...] (Nichol & Dhariwal 2021, eq. 15; beta_tilde clipped as above)."""
    shape = (-1,) + (1,) * (var_frac.ndim - 1)
    log_beta = model_log_variance(process, t, "beta").reshape(shape).to(var_frac.dtype)
    log_tilde = model_log_variance(process, t, "beta_tilde").reshape(shape).to(var_frac.dtype)
    return var_frac * log_beta + (1 - var_frac) * log_tilde


def prior_kl(process: Any, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) summed over dimensions, per example [B]."""
    alpha, sigma = process.alpha_sigma(torch.tensor(process.t_max, dtype=torch.float64))
    mean = alpha.to(x0.dtype) * x0
    logvar = torch.full_like(x0, float(2 * torch.log(sigma)))
    return normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).sum(1)


__all__ = ["HALF_BIN", "Posterior", "Variance", "discretized_gaussian_log_likelihood",
           "gaussian_log_likelihood", "learned_log_variance", "model_log_variance", "normal_kl",
           "posterior", "prior_kl"]
