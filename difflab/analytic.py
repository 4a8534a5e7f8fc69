"""Data distributions whose noisy marginals, denoiser and probability-flow ODE are exact.

For x0 ~ N(mu, diag(s^2)) and x_t = alpha x0 + sigma eps, the marginal is
q_t = N(alpha mu, alpha^2 s^2 + sigma^2) and the optimal denoiser (Tweedie) is

  E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) * (x_t - alpha mu).

The probability-flow ODE keeps the standardised coordinate z = (x_t - alpha mu) / sqrt(alpha^2
s^2 + sigma^2) fixed, so its exact solution between any two times is an affine map. These give
samplers a ground truth to converge to (tests and ``benchmarks/``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
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


class GaussianMixture:
    """x0 ~ sum_k pi_k N(mu_k, diag(std_k^2)), with everything exact for any Gaussian process.

    The noisy marginal is q_t = sum_k pi_k N(alpha mu_k, diag(m_k^2)), m_k^2 = alpha^2 std_k^2 +
    sigma^2. With posterior weights w_k(x) = pi_k N(x; alpha mu_k, m_k^2) / q_t(x), Tweedie gives

      E[x0 | x_t] = sum_k w_k (mu_k + alpha std_k^2 / m_k^2 (x - alpha mu_k)),
      E[eps | x_t] = sum_k w_k sigma (x - alpha mu_k) / m_k^2,   score = -E[eps | x_t] / sigma

    (Karras et al. 2022, Appendix B.3 for the mixture case). The probability-flow ODE has no
    closed form; ``ode_solution`` integrates it in float64 with DOP853 at tight tolerances.
    ``mu`` is [K, D], ``std`` [K, D] or [K], ``weights`` [K] (default uniform).
    """

    def __init__(self, process: Process, mu: Tensor, std: Tensor,
                 weights: Tensor | None = None):
        self.process = process
        self.mu = mu.to(torch.float64)
        std = std.to(torch.float64)
        self.std = std[:, None].expand_as(self.mu) if std.ndim == 1 else std
        k = self.mu.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights
        self.log_w = (w.to(torch.float64) / w.sum()).log()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn((n, self.mu.shape[1]), generator=generator, dtype=torch.float64)
        return self.mu[k] + self.std[k] * z

    def _components(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, ...]:
        """Per-component quantities [B or 1, K, D] and the log joint [B, K] (one shared
        time keeps the variances at [1, K, D], computed once for the batch)."""
        t = as_time(t, x).reshape(-1)
        alpha, sigma = self.process.alpha_sigma(t)
        a, s = alpha.to(x.dtype)[:, None, None], sigma.to(x.dtype)[:, None, None]
        m2 = a**2 * self.std**2 + s**2                      # [B or 1, K, D]
        r = x[:, None, :] - a * self.mu                     # [B, K, D]
        norm = (m2.log() + math.log(2 * math.pi)).sum(-1)   # [B or 1, K]
        logp = self.log_w - 0.5 * ((r**2 / m2).sum(-1) + norm)
        return a, s, m2, r, logp

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """log q_t(x) [B], exact (t = t_min gives the data log-density)."""
        return self._components(x, t)[-1].logsumexp(-1)

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        """The exact denoiser E[x0 | x_t] and noise estimate E[eps | x_t]."""
        a, s, m2, r, logp = self._components(x, t)
        w = (logp - logp.logsumexp(-1, keepdim=True)).exp()  # [B, K]
        wq = w[..., None] * (r / m2)                         # [B, K, D]
        x0 = w @ self.mu + a[:, 0] * (wq * self.std**2).sum(1)
        eps = s[:, 0] * wq.sum(1)
        return Prediction(x0=x0, eps=eps)

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        a, s, m2, r, logp = self._components(x, t)
        return -((logp - logp.logsumexp(-1, keepdim=True)).exp()[..., None] * r / m2).sum(1)

    def ode_solution(self, x: Tensor, t_from: float, t_to: float, rtol: float = 1e-11,
                     atol: float = 1e-11) -> Tensor:
        """The probability-flow ODE map x_{t_from} -> x_{t_to} in float64 (scipy DOP853 on
        dy/du = sigma~ eps_hat, y = x / alpha, u = log sigma~; to sigma~ = 1e-9 for clean t_to).
        From pure noise (alpha(t_from) = 0, e.g. rectified flow at t = 1, where y is
        infinite) it integrates dx/dt = alpha' x0_hat + sigma' eps_hat in t instead."""
        from scipy.integrate import solve_ivp

        if float(self.process.alpha(t_from)) == 0:
            return self._ode_in_t(x, t_from, t_to, rtol, atol)
        lam = self.process.log_snr(torch.tensor([t_from, t_to], dtype=torch.float64))
        u0 = float(-0.5 * lam[0])
        u1 = max(float(-0.5 * lam[1]), math.log(1e-9))
        x = x.to(torch.float64)
        shape = x.shape

        def rhs(u: float, y: np.ndarray) -> np.ndarray:
            t = self.process.t_from_log_snr(torch.tensor(-2.0 * u, dtype=torch.float64))
            a = float(self.process.alpha(t))
            eps = self(a * torch.from_numpy(y).reshape(shape), t).eps
            return (math.exp(u) * eps).flatten().numpy()

        a0 = float(self.process.alpha(t_from))
        sol = solve_ivp(rhs, (u0, u1), (x / a0).flatten().numpy(), method="DOP853",
                        rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        a1 = float(self.process.rates_from_log_snr(torch.tensor(-2.0 * u1))[0])
        return a1 * torch.from_numpy(sol.y[:, -1]).reshape(shape)

    def _ode_in_t(self, x: Tensor, t_from: float, t_to: float, rtol: float, atol: float
                  ) -> Tensor:
        """The PF-ODE map in the process time: dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat
        (the marginal velocity of the path x_t = alpha x_0 + sigma eps, Lipman et al. 2022)."""
        from scipy.integrate import solve_ivp

        x = x.to(torch.float64)
        shape = x.shape

        def rhs(t: float, y: np.ndarray) -> np.ndarray:
            tt = torch.tensor(t, dtype=torch.float64)
            da, ds = (float(r) for r in self.process.alpha_sigma_dt(tt))
            pred = self(torch.from_numpy(y).reshape(shape), tt)
            return (da * pred.x0 + ds * pred.eps).flatten().numpy()

        sol = solve_ivp(rhs, (float(t_from), float(t_to)), x.flatten().numpy(),
                        method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1]).reshape(shape)


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between two equal-size sample sets [N, D] (Rabin et al.
    2012): the root mean over random unit directions of the 1-D W2^2 of sorted projections."""
    if a.shape != b.shape:
        raise ValueError(f"sample sets must have the same shape, got {a.shape} and {b.shape}")
    a, b = a.flatten(1).to(torch.float64), b.flatten(1).to(torch.float64)
    d = torch.randn(a.shape[1], n_proj, generator=generator, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    pa, pb = (a @ d).sort(0).values, (b @ d).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())
