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
from .process.cld import CLD, CLDPrediction, apply2


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


class MixtureData:
    """x0 ~ sum_k pi_k N(mu_k, diag(std_k^2)): the parameters and draws that the exact mixture
    models share. ``mu`` [K, D]; ``std`` [K, D], [K] or a scalar (0: Dirac components);
    ``weights`` [K] (default uniform)."""

    def __init__(self, mu: Tensor, std: Tensor | float, weights: Tensor | None = None):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        if self.mu.ndim != 2:
            raise ValueError(f"mu must be [K, D], got shape {tuple(self.mu.shape)}")
        std = torch.as_tensor(std, dtype=torch.float64)
        self.std = (std[:, None] if std.ndim == 1 else std).expand_as(self.mu)
        k = self.mu.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights
        self.log_w = (w.to(torch.float64) / w.sum()).log()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of x0 [n, D]."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn((n, self.mu.shape[1]), generator=generator, dtype=torch.float64)
        return self.mu[k] + self.std[k] * z


class GaussianMixture(MixtureData):
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
        super().__init__(mu, std, weights)
        self.process = process

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


# Gaussian-mixture data under critically-damped Langevin diffusion, with an exact score.
#
# Data x_0 ~ sum_k pi_k N(mu_k, diag(s_k^2)) in D dimensions and v_0 ~ N(0, gamma M I)
# (``process.cld``). Given x_0 the state u_t = (x_t, v_t) is Gaussian per dimension d with mean
# c_t x_0d (c_t = Psi(t, 0) e_1) and covariance Sigma_t, so component k contributes, per
# dimension, N(c_t mu_kd, C_kd) with
#
#   C_kd = s_kd^2 c_t c_t^T + Sigma_t       (2x2),
#
# and the marginal of u_t is the mixture of these. With posterior weights w_k(u) proportional to
# pi_k prod_d N(u_d; c_t mu_kd, C_kd) and residuals r_kd = u_d - c_t mu_kd,
#
#   score_d = grad_{u_d} log p_t(u) = -sum_k w_k C_kd^{-1} r_kd,
#   E[x_0d | u_t] = sum_k w_k (mu_kd + s_kd^2 c_t^T C_kd^{-1} r_kd)     (Gaussian conditioning).
#
# A single component with s = 0 is a Dirac in x (the Gaussian N(c_t mu, Sigma_t) in u): along
# its probability-flow ODE gDDIM's eps is constant (``samplers.gddim``). The model speaks the
# denoiser interface: ``model(u, t)`` returns a ``CLDPrediction`` with x0 = E[x_0 | u_t] [B, D]
# and eps = -L_t^T score [B, 2, D], CLD's Cholesky parameterisation (Dockhorn et al. 2022,
# Sec. 3.2).
# ``ode_solution`` integrates the probability-flow ODE du/dt = F u - G G^T score / 2 with scipy's
# DOP853 at tight tolerances: the reference that samplers converge to.


def _inv2(m: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse and determinant of 2x2 matrices [..., 2, 2] (closed form)."""
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    det = a * d - b * c
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    return inv / det[..., None, None], det


class CLDGaussianMixture(MixtureData):
    """x_0 ~ sum_k pi_k N(mu_k, diag(std_k^2)) under a ``CLD`` process, everything exact.

    ``mu``, ``std``, ``weights`` as ``MixtureData``. States u are [B, 2, D].
    """

    def __init__(self, process: CLD, mu: Tensor, std: Tensor | float = 0.0,
                 weights: Tensor | None = None):
        super().__init__(mu, std, weights)
        self.process = process

    def sample_marginal(self, n: int, t: float, generator: torch.Generator | None = None
                        ) -> Tensor:
        """n draws of u_t [n, 2, D]: c_t x_0 + L_t z, x_0 from the data."""
        x0 = self.sample(n, generator)
        z = torch.randn((n, 2, self.mu.shape[1]), generator=generator, dtype=torch.float64)
        c = self.process.mean_coefficient(t)
        return c[None, :, None] * x0[:, None, :] + apply2(self.process.cholesky(t), z)

    def _components(self, u: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Posterior weights w [B, K], C^{-1} r [B, K, D, 2], c_t [2] at one time t."""
        c = self.process.mean_coefficient(t)                               # [2]
        cov = self.std[..., None, None] ** 2 * torch.outer(c, c) + self.process.covariance(t)
        inv, det = _inv2(cov)                                              # [K, D, 2, 2]
        r = u.transpose(1, 2)[:, None] - self.mu[None, :, :, None] * c     # [B, K, D, 2]
        ir = torch.einsum("kdij,bkdj->bkdi", inv, r)
        quad = (r * ir).sum(-1) + det.log() + 2 * math.log(2 * math.pi)    # [B, K, D]
        logp = self.log_w - 0.5 * quad.sum(-1)
        return (logp - logp.logsumexp(-1, keepdim=True)).exp(), ir, c, cov

    def score(self, u: Tensor, t: Tensor | float) -> Tensor:
        """grad_u log p_t(u) [B, 2, D], exact."""
        w, ir, _, _ = self._components(u.to(torch.float64), as_time(t).reshape(()))
        return -torch.einsum("bk,bkdi->bid", w, ir).to(u.dtype)

    def __call__(self, u: Tensor, t: Tensor | float, cond: Any = None) -> CLDPrediction:
        """x0 = E[x_0 | u_t] [B, D] and eps = -L_t^T score [B, 2, D] (CLD's parameterisation)."""
        t = as_time(t).reshape(())
        w, ir, c, _ = self._components(u.to(torch.float64), t)
        score = -torch.einsum("bk,bkdi->bid", w, ir)
        x0 = w @ self.mu + torch.einsum("bk,kd,bkd->bd", w, self.std**2, ir @ c)
        return CLDPrediction(x0=x0.to(u.dtype),
                             eps=self.process.eps_from_score(score, t).to(u.dtype))

    def ode_solution(self, u: Tensor, t_from: float, t_to: float, rtol: float = 1e-12,
                     atol: float = 1e-12) -> Tensor:
        """The probability-flow ODE map u_{t_from} -> u_{t_to} (float64, scipy DOP853)."""
        from scipy.integrate import solve_ivp

        shape = u.shape

        def rhs(t: float, y: np.ndarray) -> np.ndarray:
            uu = torch.from_numpy(y).reshape(shape)
            tt = torch.tensor(t, dtype=torch.float64)
            return self.process.pf_ode_drift(uu, tt, self.score(uu, tt)).flatten().numpy()

        sol = solve_ivp(rhs, (float(t_from), float(t_to)),
                        u.to(torch.float64).flatten().numpy(), method="DOP853", rtol=rtol,
                        atol=atol)
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
