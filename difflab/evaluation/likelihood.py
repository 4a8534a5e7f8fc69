"""Likelihood of a trained diffusion model: the variational bound (VLB) in bits per dimension.

For a discrete process of T steps (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, sec. 3):

  -log p(x0) <= L_T + sum_{t=2}^T L_{t-1} + L_0,
  L_T     = KL(q(x_T | x0) || N(0, I)),
  L_{t-1} = E_q KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)),
  L_0     = -log p(x0 | x1)   (discretized Gaussian for 8-bit data, Ho et al. eq. 13).

q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde) with (eq. 6-7)
  mu_tilde = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t,
  beta_tilde = beta_t (1 - ab_{t-1}) / (1 - ab_t);
the model's p(x_{t-1} | x_t) has mean mu_tilde(x0_hat, x_t) and a fixed variance, beta_t or
beta_tilde_t (for t = 1, where beta_tilde_1 = 0, beta_tilde_2 is used: the "clipped" log
variance of improved-diffusion). The KL, decoder and posterior pieces are pure functions in
:mod:`difflab.process.gaussian`, shared with the training losses.

The exact likelihood through the probability-flow ODE is in :mod:`.ode_likelihood`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from ..process import q_sample
from ..process.gaussian import (
    HALF_BIN,
    Posterior,
    Variance,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    learned_log_variance,
    model_log_variance,
    normal_kl,
    posterior,
    prior_kl,
)

LOG2 = math.log(2.0)

Decoder = Literal["discretized", "gaussian"]


def vlb_term(denoiser: DenoiserFn, x0: Tensor, t: Tensor, noise: Tensor, cond: Any = None,
             variance: Variance = "beta_tilde", decoder: Decoder = "discretized") -> Tensor:
    """One term of the bound per example [B], in nats: L_{t-1} for t >= 2 (a KL between
    Gaussians) and L_0 = -log p(x0 | x1) for t = 1. ``t`` [B] holds integer steps; x_t is
    drawn as alpha_t x0 + sigma_t noise. A learned-variance prediction (``var_frac``) uses its
    own variance instead of ``variance``."""
    process = denoiser.process
    x0 = x0.double()
    t = t.to(torch.float64)
    x_t = q_sample(process, x0, t, noise.double())
    pred = denoiser(x_t, t, cond)
    post = posterior(process, t)
    logvar = model_log_variance(process, t, variance).reshape(-1, *([1] * (x0.ndim - 1)))
    logvar = logvar.expand_as(x0)
    if pred.var_frac is not None:  # a learned-variance model scores with its own Sigma_theta
        logvar = learned_log_variance(process, t, pred.var_frac.double())
    mean_model = post.mean(pred.x0.double(), x_t)
    true_logvar = post.var.clamp(min=1e-300).log().reshape(logvar.shape[:1] + (1,) * (
        x0.ndim - 1)).expand_as(x0)
    kl = normal_kl(post.mean(x0, x_t), true_logvar, mean_model, logvar).flatten(1).sum(1)
    if decoder == "discretized":
        ll = discretized_gaussian_log_likelihood(x0, mean_model, 0.5 * logvar)
    elif decoder == "gaussian":
        ll = gaussian_log_likelihood(x0, mean_model, logvar)
    else:
        raise ValueError(f"decoder must be 'discretized' or 'gaussian', got {decoder!r}")
    return torch.where(t == 1, -ll.flatten(1).sum(1), kl)


@dataclass
class VLBResult:
    """Per-example terms of the bound in nats [B]; ``total`` = prior + terms + decoder."""

    prior: Tensor
    terms: Tensor       # sum_{t=2}^T L_{t-1} (estimated when only some steps are evaluated)
    decoder: Tensor     # L_0
    dims: int

    @property
    def total(self) -> Tensor:
        return self.prior + self.terms + self.decoder

    @property
    def bits_per_dim(self) -> Tensor:
        return self.total / (self.dims * LOG2)


def vlb_steps(T: int, steps: int | None, generator: torch.Generator | None
              ) -> tuple[Tensor, Tensor]:
    """The steps t in 2..T whose KL terms are evaluated and their weights: all T - 1 steps with
    weight 1 when ``steps`` is None, else a stratified sample, one step drawn uniformly from
    each of ``steps`` contiguous strata and weighted by its stratum's size (unbiased). The
    terms are largest at small t, so the first strata are the narrowest (geometric edges)."""
    if steps is None or steps >= T - 1:
        ts = torch.arange(T, 1, -1)
        return ts, torch.ones(len(ts), dtype=torch.float64)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    # strata [edges[i], edges[i+1]) of offsets t - 2 in 0..T-2; the first ones are single steps
    edges = torch.unique(torch.logspace(0, math.log10(T - 1), steps + 1,
                                        dtype=torch.float64).round().long()) - 1
    edges[-1] = T - 1
    lo, hi = edges[:-1], edges[1:]
    u = torch.rand(len(lo), generator=generator, dtype=torch.float64)
    ts = lo + (u * (hi - lo)).long() + 2
    return ts.flip(0), (hi - lo).to(torch.float64).flip(0)


@torch.no_grad()
def vlb(denoiser: DenoiserFn, x0: Tensor, cond: Any = None, *, variance: Variance = "beta_tilde",
        decoder: Decoder = "discretized", steps: int | None = None,
        generator: torch.Generator | None = None) -> VLBResult:
    """The variational bound L_T + sum L_{t-1} + L_0 per example (nats, and bits/dim via
    ``.bits_per_dim``) for data x0 [B, ...] in [-1, 1] (8-bit grid for the discretized decoder).

    With ``steps=None`` all T - 1 KL terms are evaluated (T network calls, one noise draw per
    step, as improved-diffusion's ``calc_bpd_loop``); otherwise a stratified sample of
    ``steps`` of them gives an unbiased estimate (:func:`vlb_steps`). Noise comes from
    ``generator``.
    """
    process = denoiser.process
    x0 = x0.double()
    B = x0.shape[0]
    ts, weights = vlb_steps(int(process.T), steps, generator)
    terms = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for t, w in zip(ts.tolist(), weights.tolist(), strict=True):
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
        tt = torch.full((B,), float(t), dtype=torch.float64, device=x0.device)
        terms += w * vlb_term(denoiser, x0, tt, noise, cond, variance, decoder)
    one = torch.ones(B, dtype=torch.float64, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    dec = vlb_term(denoiser, x0, one, noise, cond, variance, decoder)
    return VLBResult(prior=prior_kl(process, x0), terms=terms, decoder=dec,
                     dims=int(x0[0].numel()))


__all__ = ["HALF_BIN", "Posterior", "VLBResult", "discretized_gaussian_log_likelihood",
           "gaussian_log_likelihood", "learned_log_variance", "model_log_variance", "normal_kl",
           "posterior", "prior_kl", "vlb", "vlb_steps", "vlb_term"]
