"""The Gaussian forward process as one interface: alpha(t), sigma(t), log-SNR lambda(t).

Notation map (code name -> paper symbol):

- ``alpha``   -> sqrt(alpha_bar_t) in DDPM (Ho et al. 2020), alpha_t in VDM (Kingma et al. 2021),
  the "signal rate" in the Keras DDIM example;
- ``sigma``   -> sqrt(1 - alpha_bar_t), sigma_t in VDM, the "noise rate";
- ``log_snr`` -> lambda_t = log(alpha_t^2 / sigma_t^2).

Every process here except ``VEProcess`` (EDM's alpha = 1, sigma = t) and ``RectifiedFlow``
(alpha = 1 - t, sigma = t), which override the methods below that assume it, is variance
preserving (alpha^2 + sigma^2 = 1), so lambda alone fixes both rates: alpha^2 = sigmoid(lambda),
sigma^2 = sigmoid(-lambda). Working through lambda keeps
the endpoints exact: lambda = +inf gives clean data (alpha = 1, sigma = 0) and lambda = -inf
pure noise, with no 0/0 on the way.

Time runs from ``t_min`` (least noise) to ``t_max`` (most noise). Discrete schedules use the
DDPM step index t in [0, T] (0 = data); continuous processes use t in [0, 1].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor


@cache
def gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the n-point Gauss-Legendre rule on [0, 1], float64 (cached: do
    not modify them in place)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)


def as_time(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    """Return ``t`` as a float64 tensor (schedules are evaluated in double precision)."""
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=torch.float64, device=device)


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-example value [B] (or a scalar) to broadcast against x [B, ...]."""
    v = v.to(dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class Process(ABC):
    """A Gaussian process q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I); the defaults here are
    those of a variance-preserving one (alpha^2 + sigma^2 = 1), which other processes
    override (``alpha_sigma``, ``rates_from_log_snr``, ``log_alpha_slope``)."""

    t_min: float = 0.0
    t_max: float = 1.0
    is_discrete: bool = False

    @abstractmethod
    def log_snr(self, t: Tensor | float) -> Tensor:
        """lambda(t) = log(alpha_t^2 / sigma_t^2), float64, decreasing in t."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable dict from which ``make_process`` rebuilds this process."""

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) in float64, exact at lambda = +-inf."""
        lam = self.log_snr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def rates_from_log_snr(self, lam: Tensor | float) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) at log-SNR lambda, float64 (VP: sqrt(sigmoid(+-lambda)))."""
        lam = as_time(lam)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def log_alpha_slope(self, lam: Tensor | float) -> Tensor:
        """d log alpha / d lambda at log-SNR lambda: with it the probability-flow ODE in
        lambda-time is dx/dlambda = slope x - sigma eps_hat / 2 (VP: sigma^2 / 2, from
        alpha^2 = sigmoid(lambda); ``samplers.euler_ode``)."""
        return 0.5 * torch.sigmoid(-as_time(lam))

    def alpha_sigma_dt(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(d alpha / dt, d sigma / dt) in float64 by central differences of ``alpha_sigma``
        (one-sided at t_min and t_max; finite wherever alpha and sigma are, also at zero
        terminal SNR, where lambda' is infinite); processes with closed forms override it.
        The velocity of the path is u = alpha' x_0 + sigma' eps (the ``flow`` prediction)."""
        t = as_time(t)
        h = 1e-6 * (self.t_max - self.t_min)
        lo = (t - h).clamp(min=self.t_min)
        hi = (t + h).clamp(max=self.t_max)
        (a0, s0), (a1, s1) = self.alpha_sigma(lo), self.alpha_sigma(hi)
        return (a1 - a0) / (hi - lo), (s1 - s0) / (hi - lo)

    def alpha(self, t: Tensor | float) -> Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.alpha_sigma(t)[1]

    def snr(self, t: Tensor | float) -> Tensor:
        return self.log_snr(t).exp()

    def c_noise(self, t: Tensor) -> Tensor:
        """The time value fed to the network, scaled to [0, 1000] whatever the time units."""
        span = self.t_max - self.t_min
        return (as_time(t) - self.t_min) * (1000.0 / span)

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """Training times t ~ U(t_min, t_max) (integers 1..T for discrete processes)."""
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        # Keep clear of t_min where sigma may be 0 and the target carries no signal.
        eps = 1e-5 * (self.t_max - self.t_min)
        return self.t_min + eps + u * (self.t_max - self.t_min - eps)

    def t_from_log_snr(self, lam: Tensor | float, iters: int = 80) -> Tensor:
        """Invert lambda(t) by bisection (lambda is monotone); subclasses give closed forms."""
        lam = as_time(lam)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # still too little noise: go later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items())
        return f"{type(self).__name__}({args})"
