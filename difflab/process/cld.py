"""Critically-damped Langevin diffusion (CLD, Dockhorn, Vahdat & Kreis 2022) in closed form.

The state is u = (x, v): data x and an auxiliary velocity v of the same shape, stored as a
tensor [B, 2, ...] (u[:, 0] = x, u[:, 1] = v). Per data dimension the forward SDE is linear
with a 2x2 drift (Dockhorn et al. 2022, eq. 5):

  du = F u dt + G dW,  F = beta [[0, 1/M], [-1, -Gamma/M]],  G = [[0, 0], [0, sqrt(2 Gamma beta)]],

with constant beta, mass M and friction Gamma. Critical damping is Gamma^2 = 4M (eq. 6), so
Gamma = 2 sqrt(M) here. The data enter as u_0 = (x_0, v_0), v_0 ~ N(0, gamma M I).

Notation map (code -> symbol): ``transition(t, s)`` -> Psi(t, s) = exp(F (t - s)), the mean map;
``covariance(t)`` -> Sigma_t, the covariance of u_t given x_0; ``cholesky(t)`` -> L_t (lower
triangular, L L^T = Sigma, CLD's own score parameterisation score = -L^{-T} eps);
``r_factor(t)`` -> R_t, gDDIM's factor (Zhang, Tao & Chen 2023, Sec. 4: R R^T = Sigma and
dR/dt = (F + G G^T Sigma^{-1} / 2) R).

Closed forms (derived here). With a = Gamma / M, F / beta has the double eigenvalue -a/2 and
N = F / beta + a/2 I is nilpotent (N^2 = 0 exactly when Gamma^2 = 4M), so with tau = beta(t - s)

  Psi(t, s) = e^{-a tau / 2} (I + tau N).

Psi(t, r) G G^T Psi(t, r)^T = 2 Gamma beta e^{-a tau} w w^T with w = (I + tau N) e_2 =
(tau / M, 1 - a tau / 2), so with B = beta t and J_k = int_0^B tau^k e^{-a tau} dtau
= k! / a^{k+1} P(k+1, a B) (P the regularised lower incomplete gamma function, accurate at
small B where 1 - e^{-aB} sum_j (aB)^j / j! would cancel)

  Sigma_t = gamma M e^{-aB} w(B) w(B)^T + 2 Gamma S,
  S = [[J_2 / M^2, (J_1 - a J_2 / 2) / M], [(J_1 - a J_2 / 2) / M, J_0 - a J_1 + a^2 J_2 / 4]].

As t -> inf it tends to diag(1, M), CLD's equilibrium.

gDDIM's factor. Every square root of Sigma_t is L_t Q for an orthogonal Q; R_t = L_t Q(theta_t)
with the rotation Q(theta) = [[cos, -sin], [sin, cos]]. Inserting it into dR/dt = A R, A = F +
G G^T Sigma^{-1} / 2, gives Q' Q^T = L^{-1} A L - L^{-1} L'; its (1, 2) entry is -theta' on the
left, and (l22 / l11) A_12 on the right (L^{-1} L' is lower triangular, row 1 of G G^T is 0, so
A_12 = F_12 = beta / M). Hence

  theta_t = -(beta / M) int_0^t l22(r) / l11(r) dr,   l22 / l11 = sqrt(det Sigma) / Sigma_xx.

The integrand grows like r^{-1/2} at 0 (Sigma_xx ~ r^2, det Sigma ~ r^3 for gamma > 0), so it
is integrated in sqrt(r) by Gauss-Legendre, where it is smooth. Any constant rotation of R would
do as well (theta_0 = 0 is a choice); gamma = 0 makes theta diverge logarithmically and is
rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import as_time, gauss_legendre

#: Gauss-Legendre nodes of the rotation-angle quadrature (in sqrt(t)).
THETA_NODES = 64


def mat2(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """The 2x2 matrices [[a, b], [c, d]] from four equal-shape tensors, shape [..., 2, 2]."""
    return torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2)


def apply2(m: Tensor, u: Tensor) -> Tensor:
    """m u per data dimension: a 2x2 matrix m [2, 2] (or per example [B, 2, 2]) times the
    state u [B, 2, ...]."""
    m = m.to(u.dtype)
    if m.ndim == 2:
        return torch.einsum("ij,bj...->bi...", m, u)
    return torch.einsum("bij,bj...->bi...", m, u)


class CLD:
    """Critically-damped Langevin diffusion on t in [0, t_max] (Dockhorn et al. 2022).

    ``beta``: the constant time scale; ``mass``: M (Gamma = 2 sqrt(M), critical damping);
    ``gamma``: the initial velocity variance factor, v_0 ~ N(0, gamma M I). The defaults are
    the paper's CIFAR-10 settings (beta = 4, M^{-1} = 4, gamma = 0.04). ``t_min``: the
    smallest time a sampler may stop at (Sigma_0 is singular, so samplers end at t > 0).
    """

    is_discrete = False

    def __init__(self, beta: float = 4.0, mass: float = 0.25, gamma: float = 0.04,
                 t_min: float = 1e-3, t_max: float = 1.0):
        if not (beta > 0 and mass > 0 and gamma > 0 and 0 < t_min < t_max):
            raise ValueError(f"CLD needs beta > 0, mass > 0, gamma > 0 and 0 < t_min < t_max, "
                             f"got beta={beta}, mass={mass}, gamma={gamma}, t_min={t_min}, "
                             f"t_max={t_max}")
        self.beta, self.mass, self.gamma = float(beta), float(mass), float(gamma)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.friction = 2.0 * math.sqrt(self.mass)     # Gamma, critical damping Gamma^2 = 4M
        self.a = self.friction / self.mass              # F / beta has eigenvalue -a/2 twice

    def to_config(self) -> dict[str, Any]:
        return {"kind": "cld", "beta": self.beta, "mass": self.mass, "gamma": self.gamma,
                "t_min": self.t_min, "t_max": self.t_max}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "kind")
        return f"CLD({args})"

    # -- the SDE's coefficients ------------------------------------------------------------

    def drift_matrix(self) -> Tensor:
        """F = beta [[0, 1/M], [-1, -Gamma/M]] (2x2, float64)."""
        m = self.mass
        return self.beta * torch.tensor([[0.0, 1.0 / m], [-1.0, -self.friction / m]],
                                        dtype=torch.float64)

    def diffusion_matrix(self) -> Tensor:
        """G G^T = diag(0, 2 Gamma beta) (2x2, float64)."""
        return torch.tensor([[0.0, 0.0], [0.0, 2.0 * self.friction * self.beta]],
                            dtype=torch.float64)

    # -- closed forms ----------------------------------------------------------------------

    def transition(self, t: Tensor | float, s: Tensor | float) -> Tensor:
        """Psi(t, s) = exp(F (t - s)) = e^{-a tau/2} (I + tau N), tau = beta (t - s); shape
        [..., 2, 2] for broadcast t, s (t < s is the backward map)."""
        tau = self.beta * (as_time(t) - as_time(s))
        e = torch.exp(-0.5 * self.a * tau)
        h = 0.5 * self.a * tau
        return e[..., None, None] * mat2(1.0 + h, tau / self.mass, -tau, 1.0 - h)

    def _j(self, k: int, b: Tensor) -> Tensor:
        """J_k(B) = int_0^B tau^k e^{-a tau} dtau = k! / a^{k+1} P(k+1, a B)."""
        p = torch.special.gammainc(torch.full_like(b, k + 1.0), self.a * b)
        return math.factorial(k) / self.a ** (k + 1) * p

    def covariance(self, t: Tensor | float) -> Tensor:
        """Sigma_t, the covariance of u_t given x_0 (module docstring), [..., 2, 2]."""
        b = self.beta * as_time(t)
        m, a, g = self.mass, self.a, self.friction
        j0, j1, j2 = self._j(0, b), self._j(1, b), self._j(2, b)
        xx = 2 * g * j2 / m**2
        xv = 2 * g * (j1 - 0.5 * a * j2) / m
        vv = 2 * g * (j0 - a * j1 + 0.25 * a * a * j2)
        w0, w1 = b / m, 1.0 - 0.5 * a * b
        c = self.gamma * m * torch.exp(-a * b)
        return mat2(xx + c * w0 * w0, xv + c * w0 * w1, xv + c * w0 * w1, vv + c * w1 * w1)

    def mean_coefficient(self, t: Tensor | float) -> Tensor:
        """c_t = Psi(t, 0) e_1: the mean of u_t given x_0 is c_t x_0, shape [..., 2]."""
        return self.transition(t, 0.0)[..., :, 0]

    def cholesky(self, t: Tensor | float) -> Tensor:
        """L_t, the lower-triangular factor of Sigma_t (CLD's parameterisation), [..., 2, 2]."""
        s = self.covariance(t)
        l11 = s[..., 0, 0].sqrt()
        det = s[..., 0, 0] * s[..., 1, 1] - s[..., 0, 1] ** 2
        return mat2(l11, torch.zeros_like(l11), s[..., 1, 0] / l11, (det / s[..., 0, 0]).sqrt())

    def rotation_angle(self, t: Tensor | float) -> Tensor:
        """theta_t = -(beta / M) int_0^t l22 / l11 dr (module docstring), by the
        ``THETA_NODES``-point Gauss-Legendre rule in rho = sqrt(r): dr = 2 rho drho."""
        t = as_time(t)
        x, w = gauss_legendre(THETA_NODES)
        rho = t.sqrt()[..., None] * x                          # [..., n]
        s = self.covariance(rho**2)
        det = (s[..., 0, 0] * s[..., 1, 1] - s[..., 0, 1] ** 2).clamp(min=0.0)
        ratio_rho = 2.0 * det.sqrt() / s[..., 0, 0] * rho      # 2 rho l22 / l11, smooth
        return -(self.beta / self.mass) * t.sqrt() * (ratio_rho * w).sum(-1)

    def r_factor(self, t: Tensor | float) -> Tensor:
        """R_t = L_t Q(theta_t): gDDIM's square root of Sigma_t, [..., 2, 2]."""
        return self.cholesky(t) @ rotation(self.rotation_angle(t))

    # -- parameterisations -----------------------------------------------------------------

    def score_from_eps(self, eps: Tensor, t: Tensor | float) -> Tensor:
        """grad_u log p_t(u) = -L_t^{-T} eps for eps in CLD's Cholesky parameterisation
        (Dockhorn et al. 2022, Sec. 3.2); eps [B, 2, ...] at one time t."""
        lt = self.cholesky(as_time(t).reshape(()))
        return -apply2(torch.linalg.inv(lt).T, eps)

    def eps_from_score(self, score: Tensor, t: Tensor | float) -> Tensor:
        """eps = -L_t^T score, the inverse of ``score_from_eps``."""
        return -apply2(self.cholesky(as_time(t).reshape(())).T, score)

    def pf_ode_drift(self, u: Tensor, t: Tensor | float, score: Tensor) -> Tensor:
        """The probability-flow ODE du/dt = F u - G G^T score / 2 (Song et al. 2021, eq. 13),
        with the score at (u, t)."""
        return apply2(self.drift_matrix(), u) - apply2(0.5 * self.diffusion_matrix(), score)


def rotation(theta: Tensor) -> Tensor:
    """Q(theta) = [[cos, -sin], [sin, cos]], [..., 2, 2]."""
    c, s = theta.cos(), theta.sin()
    return mat2(c, -s, s, c)


def quadratic_grid(process: CLD, n: int, t_min: float | None = None,
                   t_max: float | None = None) -> Tensor:
    """A decreasing grid of n steps, quadratic in the step index (denser near the data):
    t_i = t_min + (t_max - t_min) (1 - i / n)^2, i = 0..n, float64."""
    if n < 1:
        raise ValueError(f"the grid needs n >= 1 steps, got {n}")
    lo = process.t_min if t_min is None else t_min
    hi = process.t_max if t_max is None else t_max
    r = 1.0 - torch.arange(n + 1, dtype=torch.float64) / n
    return lo + (hi - lo) * r**2



@dataclass(frozen=True)
class CLDPrediction:
    """What a CLD denoiser returns, the fields samplers read from ``parameterization.Prediction``
    (this layer sits below it): x0 = E[x_0 | u_t] [B, ...] and eps in CLD's Cholesky
    parameterisation [B, 2, ...]."""

    x0: Tensor
    eps: Tensor


__all__ = ["CLD", "CLDPrediction", "apply2", "mat2",
           "quadratic_grid", "rotation"]
