"""Exponential-integrator algebra shared by DPM-Solver, DPM-Solver++ and UniPC.

Here lambda = log(alpha / sigma) is *half* the log-SNR (Lu et al.'s lambda). Along a VP
process the probability-flow ODE, written in this lambda, has an exactly
integrable linear part (Lu et al. 2022, eq. 3.4; Lu et al. 2022b, eq. 9):

  data prediction:  x_t = (sigma_t / sigma_s) x_s + alpha_t int_0^h e^{-(h-u)} D(u) du,
  noise prediction: x_t = (alpha_t / alpha_s) x_s - sigma_t int_0^h e^{(h-u)} eps(u) du,

with h = lambda_t - lambda_s and u = lambda - lambda_s. The reverse SDE (DPM-Solver++ SDE)
has kernel 2 e^{-2(h-u)}. All three are integrals  int_0^h e^{-c(h-u)} P(u) du  of a
polynomial P through a few model outputs, so one routine gives the weights: the moments are
  int_0^h e^{-c(h-u)} u^k du = k! h^{k+1} phi_{k+1}(-c h),   phi_k(z) = sum_n z^n / (n + k)!
(Hochbruck & Ostermann 2010), and the Lagrange weights follow from a small Vandermonde solve.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def phi(k: int, z: float) -> float:
    """phi_k(z) = int_0^1 e^{(1-s) z} s^{k-1} / (k-1)! ds, stable for small |z| (series)."""
    if abs(z) < 1.0:
        return sum(z**n / math.factorial(n + k) for n in range(30))
    if math.isinf(z):
        return 0.0 if z < 0 else math.inf
    val = math.expm1(z)  # phi_1 * z
    val = val / z
    for j in range(1, k):
        val = (val - 1.0 / math.factorial(j)) / z
    return val


def kernel_moments(h: float, c: float, n: int) -> list[float]:
    """int_0^h e^{-c(h-u)} (u / h)^k du / h for k < n (scaled so they are O(1))."""
    return [math.factorial(k) * phi(k + 1, -c * h) for k in range(n)]


def lagrange_weights(nodes: list[float], h: float, c: float) -> list[float]:
    """Weights w_j with int_0^h e^{-c(h-u)} P(u) du = h sum_j w_j P(u_j) for any polynomial P
    of degree < len(nodes); ``nodes`` are the u_j (lambda offsets from the step start)."""
    n = len(nodes)
    r = torch.tensor([u / h for u in nodes], dtype=torch.float64)
    vander = torch.stack([r**k for k in range(n)])          # [k, j] = r_j^k
    m = torch.tensor(kernel_moments(h, c, n), dtype=torch.float64)
    return torch.linalg.solve(vander, m).tolist()


def half_log_snr_grid(process, ts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(lambda = log(alpha / sigma), alpha, sigma) on the whole grid, float64, computed once
    per sampler call."""
    lam = 0.5 * process.log_snr(ts)
    a, s = process.alpha_sigma(ts)
    return lam, a, s


__all__ = ["kernel_moments", "lagrange_weights", "half_log_snr_grid", "phi"]
