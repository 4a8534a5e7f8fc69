"""The adaptive-step reverse-SDE solver of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast When
Generating Data with Score-Based Models", Algorithm 1).

The reverse SDE is integrated in log-SNR lambda, as ``euler_maruyama`` (``sde``) writes it:

  dx = (k x - sigma eps_hat) dlambda + sigma dW_lambda,   k = d log alpha / d lambda,

with lambda rising from lambda(ts[0]) to the least noisy level a sampler should visit
(``end_time``: ``grids.default_sigma_min``, the paper's epsilon, or ts[-2] if less noisy).
Why lambda and not the process time: one step size means the same in every process (DDPM's
t in 1..1000, VP-SDE's in [0, 1], VE, rectified flow), the drift's stiffness is of order 1 per
unit lambda at every noise level, and the Euler-Maruyama proposal is exactly difflab's
``euler_maruyama`` step. Each attempt, from x at lambda with step h and one fresh n ~ N(0, I):

  x'  = x + h f(x, lambda) + sigma(lambda) sqrt(h) n                     (Euler-Maruyama)
  x~  = x + h f(x', lambda + h) + sigma(lambda + h) sqrt(h) n            (same noise)
  x'' = (x' + x~) / 2                                                    (improved Euler)

  delta = max(eps_abs, eps_rel max(|x'|, |x'_prev|))      (elementwise; x'_prev: the last
                                                          accepted x', initially x)
  E = ||(x' - x'') / delta||_2 / sqrt(dim)                (per example)

The step is accepted when E <= 1 (x <- x'', the extrapolated value, as the paper), and
h <- min(h_max, theta h E^(-r), distance left). Every example has its own lambda and h
(the paper's per-sample steps), so with one generator per example an example's sample does
not depend on the batch. One departure from the paper's code: a rejected example retries with
the same n (scaled to the smaller step) instead of a fresh draw. Redrawing rejects large
noise draws selectively, which biases the samples more the tighter the tolerance (on a
16-dimensional Gaussian, the VP-SDE, eps_rel 0.01: sample std +8% with fresh draws, +0.2%
with the draw kept; ``tests/test_sampler_adaptive_sde.py``). The eps_hat at (x, lambda) is
reused after a step the whole batch rejected. The end is the shared final denoising step there
(``final_step``): x0_hat. Read the NFE with ``CountingDenoiser`` (as ``rk45``): every
attempt costs 2 evaluations (1 after a rejection of the whole batch), plus 1 for the last
step; ``max_nfe`` caps it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn, Prediction
from ..process import Process, expand_like
from .base import Callback, Generators, check_grid, final_step, randn_like, report, zero_snr_start
from .grids import default_sigma_min
from .options import SamplerOption, declare_options


class _Sde:
    """The reverse SDE in lambda for one process and denoiser, at per-example log-SNRs."""

    def __init__(self, denoiser: DenoiserFn, cond: Any):
        self.denoiser, self.process, self.cond = denoiser, denoiser.process, cond
        self.nfe = 0

    def drift(self, x: Tensor, lam: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Prediction]:
        """(f(x, lambda) = k x - sigma eps_hat, sigma, the prediction) at log-SNRs ``lam`` [B]
        (times ``t``): one evaluation."""
        k = expand_like(self.process.log_alpha_slope(lam), x).to(x.dtype)
        sigma = expand_like(self.process.rates_from_log_snr(lam)[1], x).to(x.dtype)
        pred = self.denoiser(x, t, self.cond)
        self.nfe += 1
        return k * x - sigma * pred.eps, sigma, pred


def end_time(process: Process, ts: Tensor) -> Tensor:
    """Where the SDE integration stops, before the final denoising step: the least noisy level
    a sampler should visit, sigma~ = ``default_sigma_min`` (the paper's epsilon: DDPM's first
    step, 1e-3 of the span in continuous time), if it lies strictly between ts[-1] and ts[-2];
    else ts[-2] (a grid that ends at a noisy time, or a finer last point)."""
    t_floor = process.t_from_log_snr(torch.tensor(-2 * math.log(default_sigma_min(process)),
                                                  dtype=torch.float64))
    return t_floor if float(ts[-1]) < float(t_floor) < float(ts[-2]) else ts[-2]


def local_error(x1: Tensor, x2: Tensor, x1_prev: Tensor, eps_abs: float, eps_rel: float
                ) -> Tensor:
    """E per example: ||(x' - x'') / delta||_2 / sqrt(dim) with delta = max(eps_abs, eps_rel
    max(|x'|, |x'_prev|)) (Jolicoeur-Martineau et al. 2021, Sec. 3.1, the scaled L2 norm)."""
    delta = (eps_rel * torch.maximum(x1.abs(), x1_prev.abs())).clamp(min=eps_abs)
    return ((x1 - x2) / delta).flatten(1).pow(2).mean(1).sqrt()


@declare_options(
    SamplerOption("eps_abs", float, 0.0078, "absolute tolerance of the local error (the paper's "
                  "0.0078 for data in [-1, 1])", min=0.0, min_exclusive=True),
    SamplerOption("eps_rel", float, 0.05, "relative tolerance of the local error",
                  min=0.0, min_exclusive=True),
    SamplerOption("h_init", float, 0.1, "first step size, in log-SNR", min=0.0,
                  min_exclusive=True),
    SamplerOption("h_max", float, math.inf, "largest step size, in log-SNR", min=0.0,
                  min_exclusive=True),
    SamplerOption("r", float, 0.9, "exponent of the step-size update h E^(-r)", min=0.0,
                  min_exclusive=True),
    SamplerOption("theta", float, 0.9, "safety factor of the step-size update", min=0.0,
                  min_exclusive=True),
    SamplerOption("max_nfe", int, None, "cap on network evaluations: when only the last one "
                  "is left the sampler denoises from where it is (None: no cap)", min=2))
@zero_snr_start
@torch.no_grad()
def adaptive_sde(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
                 callback: Callback | None = None, *, cond: Any = None, eps_abs: float = 0.0078,
                 eps_rel: float = 0.05, h_init: float = 0.1, h_max: float = math.inf,
                 r: float = 0.9, theta: float = 0.9, max_nfe: int | None = None) -> Tensor:
    """Adaptive reverse-SDE sampler (Jolicoeur-Martineau et al. 2021, Alg. 1): Euler-Maruyama
    proposals corrected by improved Euler with the same noise, step sizes in log-SNR chosen
    per example from the mixed absolute / relative local error. Uses only the grid's ends: it
    integrates from ts[0] to ``end_time`` (sigma~ = ``default_sigma_min``, or ts[-2] if less
    noisy), then takes the final denoising step. The callback sees every attempt (t: the
    per-example times)."""
    ts = check_grid(ts)
    sde, process = _Sde(denoiser, cond), denoiser.process
    t_end = end_time(process, ts)
    lam_end = float(process.log_snr(t_end))
    lam = torch.full((x.shape[0],), float(process.log_snr(ts[0])), dtype=torch.float64)
    t = torch.full_like(lam, float(ts[0]))
    h = (lam_end - lam).clamp(max=min(h_init, h_max))
    h_floor = 1e-10 * max(lam_end - float(lam[0]), 1.0)
    x_prev, cached, i = x, None, 0
    n, retry = torch.zeros_like(x), torch.zeros_like(lam, dtype=torch.bool)
    budget = math.inf if max_nfe is None else max_nfe
    while bool((lam < lam_end).any()) and sde.nfe + (1 if cached else 2) + 1 <= budget:
        f0, s0, pred = cached or sde.drift(x, lam, t)
        lam_next = torch.where(h >= lam_end - lam, torch.full_like(lam, lam_end), lam + h)
        t_next = torch.where(lam_next == lam_end, t_end, process.t_from_log_snr(lam_next))
        hx = expand_like(h, x).to(x.dtype)
        # a fresh draw per example and attempt, kept instead while an example retries
        n = torch.where(retry.view(-1, *[1] * (x.ndim - 1)), n, randn_like(x, generator))
        noise = hx.sqrt() * n
        x1 = x + hx * f0 + s0 * noise                                   # Euler-Maruyama
        f1, s1, _ = sde.drift(x1, lam_next, t_next)
        x2 = 0.5 * (x1 + x + hx * f1 + s1 * noise)                      # improved Euler
        err = local_error(x1, x2, x_prev, eps_abs, eps_rel)
        if not bool(torch.isfinite(err).all()):
            raise RuntimeError("sampler 'adaptive_sde': the local error is not finite (the "
                               "denoiser returned inf or nan)")
        ok = (err <= 1) & (lam < lam_end)
        okx = ok.view(-1, *[1] * (x.ndim - 1))
        x, x_prev = torch.where(okx, x2, x), torch.where(okx, x1, x_prev)
        lam, t = torch.where(ok, lam_next, lam), torch.where(ok, t_next, t)
        factor = theta * err.to(torch.float64).clamp(min=1e-10) ** -r
        h = torch.minimum((h * factor).clamp(max=h_max), lam_end - lam)
        if bool(((h < h_floor) & (h < lam_end - lam)).any()):
            raise RuntimeError("sampler 'adaptive_sde': the step size underflowed; raise "
                               "eps_abs or eps_rel")
        retry = ~ok
        cached = None if bool(ok.any()) else (f0, s0, pred)
        report(callback, i, t, x, pred)
        i += 1
    return final_step(callback, i, t, denoiser(x, t, cond))


__all__ = ["adaptive_sde", "local_error"]
