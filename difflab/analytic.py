"""Data distributions whose noisy marginals, denoiser and probability-flow ODE are exact.

For x0 ~ N(mu, diag(s^2)) and x_t = alpha x0 + sigma eps, the marginal is
q_t = N(alpha mu, alpha^2 s^2 + sigma^2) and the optimal denoiser (Tweedie) is

  E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) * (x_t - alpha mu).

The probability-flow ODE keeps the standardised coordinate z = (x_t - alpha mu) / sqrt(alpha^2
s^2 + sigma^2) fixed, so its exact solution between any two times is an affine map. These give
samplers a ground truth to converge to (tests and ``benchmarks/``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .parameterization import Prediction
from .process import Process, as_time, expand_like


class GaussianData:
    """x0 ~ N(mu, diag(std^2)) with an exact denoiser for a given process."""

    def __init__(self, process: Process, mu: Tensor, std: Tensor):
        self.process = process
        self.mu, self.std = mu.to(torch.float64), std.to(torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn((n, *self.mu.shape), generator=generator, dtype=torch.float64)
        return self.mu + self.std * z

    def _marginal_std(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        alpha, sigma = self.process.alpha_sigma(t)
        a, s = expand_like(alpha, x), expand_like(sigma, x)
        return a, s, (a**2 * self.std**2 + s**2).sqrt()

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        """The exact denoiser D(x_t, t) = E[x0 | x_t], as a ``Prediction``."""
        t = as_time(t, x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        a, s, m = self._marginal_std(x, t)
        x0 = self.mu + a * self.std**2 / m**2 * (x - a * self.mu)
        return Prediction(x0=x0, eps=s * (x - a * self.mu) / m**2)

    def ode_solution(self, x: Tensor, t_from: Tensor | float, t_to: Tensor | float) -> Tensor:
        """Exact probability-flow ODE map x_{t_from} -> x_{t_to}."""
        a1, _, m1 = self._marginal_std(x, as_time(t_from, x))
        a2, _, m2 = self._marginal_std(x, as_time(t_to, x))
        return a2 * self.mu + m2 / m1 * (x - a1 * self.mu)
