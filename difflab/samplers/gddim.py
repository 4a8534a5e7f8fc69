"""gDDIM: generalised DDIM for linear diffusions (Zhang, Tao & Chen, ICLR 2023).

For a linear forward SDE du = F_t u dt + G_t dW with transition Psi(t, s) and covariance
Sigma_t, write the score as grad log p_t(u) = -K_t^{-T} eps(u, t) for a square root K_t K_t^T =
Sigma_t. The probability-flow ODE du/dt = F u - G G^T score / 2 then reads

  du/dt = F_t u + (1/2) G_t G_t^T K_t^{-T} eps(u, t),

whose linear part is integrated exactly (the exponential integrator, Sec. 4):

  u_s = Psi(s, t) u_t + int_t^s Psi(s, r) (1/2) G G^T K_r^{-T} eps(u_r, r) dr.

gDDIM's choice is K_t = R_t with dR/dt = (F + G G^T Sigma^{-1} / 2) R, R R^T = Sigma
(``process.cld``): for data that are a single point eps is then constant along every ODE
solution (u_t = m_t + R_t eps with m the mean), and the step with eps frozen at its value at t,

  u_s = Psi(s, t) u_t + (R_s - Psi(s, t) R_t) eps_t        (the integral in closed form),

lands exactly on the ODE solution. Any other square root, such as CLD's Cholesky factor L_t,
lets eps rotate along the path and the frozen-eps step is only first order. With order q >= 1
eps is the polynomial in t through the latest q + 1 outputs (Adams-Bashforth style, fewer at
the first steps), whose integrals against the kernel are taken by Gauss-Legendre quadrature in
log t; the constant part stays the closed form above.

Scalar VP processes (``difflab.process.Process``): Psi = alpha_s / alpha_t and R_t = sigma_t,
so the q = 0 step is DDIM, u_s = (alpha_s / alpha_t) u_t + (sigma_s - alpha_s sigma_t / alpha_t)
eps (Song et al. 2021, eq. 12 with eta = 0), and q >= 1 is the exponential multistep in t of
DEIS (Zhang & Chen 2023, tAB). There, as in ``ddim``, the last step returns x0_hat.

Stochastic gDDIM (``lam`` = lambda > 0, order 0). The reverse SDEs
du = [F u - (1 + lambda^2)/2 G G^T score] dt + lambda G dW share the marginals of the forward
process (lambda = 0 is the ODE, 1 the reverse SDE). For one-point data the score is
-Sigma^{-1}(u - m), so the deviation d = u - m solves a linear SDE whose transition from t to s
is exact: d_s = Phi(s, t) d_t + N(0, P(s, t)) with, integrating from t down to s,

  dPhi/dr = A Phi,  dP/dr = A P + P A^T - lambda^2 G G^T,
  A = F + (1 + lambda^2)/2 G G^T Sigma^{-1},

Phi(t, t) = I, P(t, t) = 0 (then Phi Sigma_t Phi^T + P = Sigma_s: the marginal is kept; at
lambda = 0, Phi = R_s R_t^{-1} and P = 0). With d_t = K_t eps_t for the model's eps, the step is

  u_s = Psi(s, t) u_t + (Phi(s, t) - Psi(s, t)) K_t eps_t + P^{1/2} z,

exact for one-point data. K_t eps_t = -Sigma_t score does not depend on the factor, so ``factor``
plays no part. Phi and P have no closed form for lambda > 0; they are integrated per step
(scipy DOP853, rtol 1e-10). On a scalar VP process they do: Phi = (alpha_s / alpha_t)
(sigma_s alpha_t / (alpha_s sigma_t))^{1 + lambda^2}, P = sigma_s^2 - Phi^2 sigma_t^2, and
lambda = 1 is DDPM's posterior with beta_tilde (``ddpm``), the same step as DDIM with eta = 1.

CLD processes (``process.cld.CLD``): the state is u = (x, v), [B, 2, ...]; the denoiser returns
eps in CLD's Cholesky parameterisation, which gDDIM rotates into its own, eps_R = Q_t^T eps_L
(R = L Q). The grid must end at t > 0 (Sigma_0 is singular) and the sampler returns u there.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..process import Process
from ..process.base import gauss_legendre
from ..process.cld import CLD, apply2, rotation
from .base import (
    Callback,
    Generators,
    check_grid,
    final_step,
    randn_like,
    report,
    zero_snr_start,
)
from .options import SamplerOption, declare_options

#: Gauss-Legendre nodes per step for the weights of the extrapolated (q >= 1) eps.
QUAD_NODES = 32
ORDERS = (0, 1, 2)
FACTORS = ("R", "cholesky")


def lagrange_basis(nodes: Tensor, r: Tensor) -> Tensor:
    """l_j(r) = prod_{m != j} (r - n_m) / (n_j - n_m) for the k ``nodes`` at the points r [n];
    shape [k, n]."""
    rows = []
    for j in range(len(nodes)):
        v = torch.ones_like(r)
        for m in range(len(nodes)):
            if m != j:
                v = v * (r - nodes[m]) / (nodes[j] - nodes[m])
        rows.append(v)
    return torch.stack(rows)


def log_nodes(t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes r in [s, t] spaced in log r, and signed weights for int_t^s dr
    (negative for s < t): the kernels grow like 1 / r near the data, smooth in log r."""
    x, w = gauss_legendre(QUAD_NODES)
    span = s.log() - t.log()
    r = (t.log() + span * x).exp()
    return r, r * span * w


# -- CLD ------------------------------------------------------------------------------------

def cld_factor(process: CLD, t: Tensor, factor: str) -> Tensor:
    """K_t: gDDIM's R_t or CLD's Cholesky L_t, [..., 2, 2]."""
    return process.r_factor(t) if factor == "R" else process.cholesky(t)


def cld_kernel(process: CLD, s: Tensor, r: Tensor, factor: str) -> Tensor:
    """Psi(s, r) (1/2) G G^T K_r^{-T} at the points r [n]: the integrand multiplying eps."""
    k_inv_t = torch.linalg.inv(cld_factor(process, r, factor)).mT
    return process.transition(s, r) @ (0.5 * process.diffusion_matrix()) @ k_inv_t


def cld_step_weights(process: CLD, ts: Tensor, i: int, k: int, factor: str) -> Tensor:
    """W_j = int_{t_i}^{t_{i+1}} Psi(t_{i+1}, r) (1/2) G G^T K_r^{-T} l_j(r) dr for the
    Lagrange basis through the k latest times t_i, t_{i-1}, ... (newest first); [k, 2, 2].
    For K = R the constant part sum_j W_j is the closed form R_s - Psi(s, t) R_t."""
    t, s = ts[i], ts[i + 1]
    if factor == "R":
        exact = process.r_factor(s) - process.transition(s, t) @ process.r_factor(t)
        if k == 1:  # frozen eps: the closed form alone, no quadrature
            return exact[None]
    r, dr = log_nodes(t, s)
    kern = cld_kernel(process, s, r, factor)                          # [n, 2, 2]
    ell = lagrange_basis(ts[i - k + 1:i + 1].flip(0), r)              # [k, n]
    w = torch.einsum("jn,nab->jab", ell * dr, kern)
    if factor == "R":
        w[0] = exact - w[1:].sum(0)
    return w


def check_cld_input(process: CLD, u: Tensor, ts: Tensor) -> Tensor:
    """The state must be [B, 2, ...] and the decreasing grid lie in (0, t_max]."""
    if u.ndim < 2 or u.shape[1] != 2:
        raise ValueError(f"gddim on CLD: the state u must be [B, 2, ...] (position, velocity), "
                         f"got shape {tuple(u.shape)}")
    ts = check_grid(ts)
    if not (float(ts[-1]) > 0 and float(ts[0]) <= process.t_max):
        raise ValueError(f"gddim on CLD: the time grid must lie in (0, t_max = "
                         f"{process.t_max:g}] (Sigma_0 is singular), got [{float(ts[-1]):g}, "
                         f"{float(ts[0]):g}]")
    return ts


def cld_stochastic_transition(process: CLD, t: float, s: float, lam: float
                              ) -> tuple[Tensor, Tensor]:
    """(Phi(s, t), P(s, t)) of the lambda-SDE of one-point data (module docstring), by DOP853
    from t down to s at rtol 1e-10; float64 [2, 2] each."""
    from scipy.integrate import solve_ivp

    f = process.drift_matrix().numpy()
    gg = process.diffusion_matrix().numpy()

    def rhs(r: float, y: np.ndarray) -> np.ndarray:
        a = f + 0.5 * (1 + lam**2) * gg @ np.linalg.inv(process.covariance(r).numpy())
        phi, p = y[:4].reshape(2, 2), y[4:].reshape(2, 2)
        return np.concatenate([(a @ phi).ravel(), (a @ p + p @ a.T - lam**2 * gg).ravel()])

    y0 = np.concatenate([np.eye(2).ravel(), np.zeros(4)])
    sol = solve_ivp(rhs, (t, s), y0, method="DOP853", rtol=1e-10, atol=1e-12)
    if not sol.success:
        raise RuntimeError(f"gddim: the stochastic transition from t={t} to s={s} failed: "
                           f"{sol.message}")
    out = torch.from_numpy(sol.y[:, -1])
    p = out[4:].reshape(2, 2)
    return out[:4].reshape(2, 2), 0.5 * (p + p.T)


def psd_sqrt(p: Tensor) -> Tensor:
    """The symmetric square root of a positive semi-definite 2x2 matrix (eigenvalues rounded
    below zero are clipped)."""
    vals, vecs = torch.linalg.eigh(p)
    return (vecs * vals.clamp(min=0.0).sqrt()) @ vecs.T


def gddim_cld_stochastic(denoiser, u: Tensor, ts: Tensor, generator: Generators,
                         callback: Callback | None, cond: Any, lam: float) -> Tensor:
    """Stochastic gDDIM (order 0) on a CLD process; returns u at ts[-1]."""
    process: CLD = denoiser.process
    ts = check_cld_input(process, u, ts)
    for i in range(len(ts) - 1):
        t, s = float(ts[i]), float(ts[i + 1])
        pred = denoiser(u, ts[i], cond)
        phi, p = cld_stochastic_transition(process, t, s, lam)
        psi = process.transition(s, t)
        k_eps = apply2(process.cholesky(t), pred.eps)                    # = -Sigma_t score
        u = (apply2(psi, u) + apply2(phi - psi, k_eps)
             + apply2(psd_sqrt(p), randn_like(u, generator)))
        report(callback, i, ts[i], u, pred)
    return u


def gddim_cld(denoiser, u: Tensor, ts: Tensor, callback: Callback | None, cond: Any,
              order: int, factor: str) -> Tensor:
    """The deterministic gDDIM of order q on a CLD process; returns u at ts[-1]."""
    process: CLD = denoiser.process
    ts = check_cld_input(process, u, ts)
    n = len(ts) - 1
    psi = process.transition(ts[1:], ts[:-1])                         # [n, 2, 2]
    weights = [cld_step_weights(process, ts, i, min(order, i) + 1, factor) for i in range(n)]
    rot = rotation(process.rotation_angle(ts[:-1])) if factor == "R" else None
    hist: list[Tensor] = []                                           # eps_K, newest first
    for i in range(n):
        pred = denoiser(u, ts[i], cond)
        eps = apply2(rot[i].T, pred.eps) if rot is not None else pred.eps   # eps_R = Q^T eps_L
        hist = [eps, *hist[:order]]
        u_next = apply2(psi[i], u)
        for w, e in zip(weights[i], hist, strict=False):
            u_next = u_next + apply2(w, e)
        u = u_next
        report(callback, i, ts[i], u, pred)
    return u


# -- scalar VP processes --------------------------------------------------------------------

def scalar_step_weights(process: Process, ts: Tensor, i: int, k: int) -> Tensor:
    """c_j = -(alpha_s / 2) int_{lambda_t}^{lambda_s} e^{-lambda / 2} l_j(t(lambda)) dlambda,
    lambda the log-SNR: the scalar kernel (alpha_s / alpha_r) (g^2 / 2) / sigma_r dr in lambda
    (g^2 = -sigma^2 dlambda/dt); the constant part is sigma_s - alpha_s sigma_t / alpha_t. [k]"""
    a, sig = process.alpha_sigma(ts[i:i + 2])
    exact = sig[1] - a[1] * sig[0] / a[0]
    if k == 1:  # frozen eps: DDIM's coefficient, no quadrature
        return exact[None]
    lam = process.log_snr(ts[i:i + 2])
    x, w = gauss_legendre(QUAD_NODES)
    nodes = lam[0] + (lam[1] - lam[0]) * x
    dl = (lam[1] - lam[0]) * w
    ell = lagrange_basis(ts[i - k + 1:i + 1].flip(0), process.t_from_log_snr(nodes))
    c = -0.5 * a[1] * (ell * (-0.5 * nodes).exp() * dl).sum(-1)
    c[0] = exact - c[1:].sum()
    return c


def scalar_stochastic_transition(a: Tensor, sig: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """(Phi, P) from t to s on a scalar VP process, a = (alpha_t, alpha_s), sig likewise:
    Phi = (alpha_s / alpha_t) (sigma_s alpha_t / (alpha_s sigma_t))^{1 + lambda^2},
    P = sigma_s^2 - Phi^2 sigma_t^2 (module docstring)."""
    phi = a[1] / a[0] * (sig[1] * a[0] / (a[1] * sig[0])) ** (1 + lam**2)
    return phi, (sig[1] ** 2 - phi**2 * sig[0] ** 2).clamp(min=0.0)


def gddim_scalar(denoiser, x: Tensor, ts: Tensor, callback: Callback | None, cond: Any,
                 order: int, lam: float = 0.0, generator: Generators = None) -> Tensor:
    """gDDIM on a scalar VP process: DDIM for q = 0, DEIS' tAB for q >= 1; returns x0_hat of
    the last evaluation, as ``ddim`` does."""
    process = denoiser.process
    ts = check_grid(ts)
    a, sig = process.alpha_sigma(ts)
    if not float(a[0]) > 0:
        raise ValueError("gddim: the grid starts at zero terminal SNR (alpha = 0), where "
                         "alpha_s / alpha_t is infinite; start at a time with alpha > 0")
    n = len(ts) - 1
    weights = [scalar_step_weights(process, ts, i, min(order, i) + 1) for i in range(n - 1)]
    hist: list[Tensor] = []
    for i in range(n):
        pred = denoiser(x, ts[i], cond)
        if i == n - 1:
            return final_step(callback, i, ts[i], pred)
        if lam > 0:
            phi, p = scalar_stochastic_transition(a[i:i + 2], sig[i:i + 2], lam)
            psi = a[i + 1] / a[i]
            x = (psi.to(x.dtype) * x + ((phi - psi) * sig[i]).to(x.dtype) * pred.eps
                 + p.sqrt().to(x.dtype) * randn_like(x, generator))
            report(callback, i, ts[i], x, pred)
            continue
        hist = [pred.eps, *hist[:order]]
        x_next = (a[i + 1] / a[i]).to(x.dtype) * x
        for c, e in zip(weights[i], hist, strict=False):
            x_next = x_next + c.to(x.dtype) * e
        x = x_next
        report(callback, i, ts[i], x, pred)
    return x


@declare_options(
    SamplerOption("order", int, 0, "q: eps extrapolated in t by the polynomial through the "
                  "latest q + 1 outputs (0: gDDIM / DDIM; 1, 2: exponential multistep)",
                  choices=ORDERS),
    SamplerOption("factor", str, "R", "CLD only: the square root K_t of Sigma_t that eps is "
                  "taken in: R (gDDIM, exact for one-point data) or cholesky (CLD's L_t)",
                  choices=FACTORS),
    SamplerOption("lam", float, 0.0, "stochasticity lambda of gDDIM's reverse SDE family "
                  "(0: the deterministic sampler, 1: the reverse SDE; order 0 only)", min=0.0))
@torch.no_grad()
def gddim(denoiser, x: Tensor, ts: Tensor, generator: Generators = None,
          callback: Callback | None = None, *, cond: Any = None, order: int = 0,
          factor: Literal["R", "cholesky"] = "R", lam: float = 0.0) -> Tensor:
    """gDDIM (Zhang, Tao & Chen 2023, Sec. 4, Alg. 1) of order q, deterministic for lam = 0,
    on a CLD process (state [B, 2, ...], returns u at ts[-1]) or a scalar VP process (returns
    x0_hat at the end, as ``ddim``). ``generator`` draws the noise of lam > 0."""
    if order not in ORDERS:
        raise ValueError(f"gddim: option 'order' must be one of {ORDERS}, got {order!r}")
    if factor not in FACTORS:
        raise ValueError(f"gddim: option 'factor' must be one of {FACTORS}, got {factor!r}")
    if not lam >= 0:
        raise ValueError(f"gddim: option 'lam' must be >= 0, got {lam!r}")
    if lam > 0 and order != 0:
        raise ValueError(f"gddim: option 'lam' > 0 (stochastic) needs order 0, got order={order}")
    if isinstance(denoiser.process, CLD):
        if lam > 0:
            return gddim_cld_stochastic(denoiser, x, ts, generator, callback, cond, lam)
        return gddim_cld(denoiser, x, ts, callback, cond, order, factor)
    return _scalar_from_any_snr(denoiser, x, ts, generator, callback, cond=cond, order=order,
                                lam=lam)


@zero_snr_start
def _scalar_from_any_snr(denoiser, x: Tensor, ts: Tensor, generator: Generators = None,
                         callback: Callback | None = None, *, cond: Any = None, order: int = 0,
                         lam: float = 0.0) -> Tensor:
    """``gddim_scalar``, and from zero terminal SNR (alpha = 0 at ts[0], where
    alpha_s / alpha_t is infinite) first the exact DDIM step out of pure noise
    (``base.zero_snr_start``), as every other scalar sampler."""
    return gddim_scalar(denoiser, x, ts, callback, cond, order, lam, generator)


__all__ = ["cld_step_weights", "cld_stochastic_transition", "gddim", "gddim_cld",
           "gddim_cld_stochastic", "gddim_scalar", "lagrange_basis", "scalar_step_weights",
           "scalar_stochastic_transition"]
