"""Sampling the forward process: in closed form, and by running the Markov chain.

For s < t the transition of a VP process is q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)
with alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2
(Kingma et al. 2021, eq. 3-4). For consecutive DDPM steps this is alpha_{t|t-1} = sqrt(1 - beta_t),
sigma_{t|t-1}^2 = beta_t (Ho et al. 2020, eq. 2). Composing the transitions must give the
closed form q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) (eq. 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Process, as_time, expand_like


def q_sample(process: Process, x0: Tensor, t: Tensor | float, noise: Tensor) -> Tensor:
    """x_t = alpha_t x_0 + sigma_t eps, the closed form of q(x_t | x_0)."""
    alpha, sigma = process.alpha_sigma(as_time(t, x0))
    return expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * noise


def transition(process: Process, s: Tensor | float, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(alpha_{t|s}, sigma_{t|s}) of q(x_t | x_s) for s < t."""
    a_s, s_s = process.alpha_sigma(s)
    a_t, s_t = process.alpha_sigma(t)
    a_ts = a_t / a_s
    return a_ts, (s_t**2 - a_ts**2 * s_s**2).clamp(min=0).sqrt()


def q_step(process: Process, x_s: Tensor, s: Tensor | float, t: Tensor | float,
           noise: Tensor) -> Tensor:
    """One Markov step x_s -> x_t drawn from q(x_t | x_s)."""
    a_ts, s_ts = transition(process, as_time(s, x_s), as_time(t, x_s))
    return expand_like(a_ts, x_s) * x_s + expand_like(s_ts, x_s) * noise


def markov_chain(process: Process, x0: Tensor, times: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
    """Run q(x_{t_k} | x_{t_{k-1}}) along increasing ``times`` starting from x0 at times[0];
    returns x at times[-1]. For a discrete process, ``times = arange(0, t + 1)`` is DDPM's chain."""
    x = x0
    for s, t in zip(times[:-1], times[1:], strict=True):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = q_step(process, x, s, t, noise)
    return x
