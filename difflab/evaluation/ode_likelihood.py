"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, sec. 4.3 and app.
D.2; the instantaneous change of variables of Chen et al. 2018 / FFJORD, Grathwohl et al. 2019).

The probability-flow ODE dx/dt = f(x, t) - 1/2 g(t)^2 grad log p_t(x) of a VP process, written
with the log-SNR lambda as the time variable (alpha^2 = sigmoid(lambda), sigma^2 =
sigmoid(-lambda)), is

  dx/dlambda = sigma^2 / 2 * x + sigma^2 / 2 * score = sigma^2 / 2 * x - sigma / 2 * eps_hat,

because d log alpha / dlambda = sigma^2 / 2 and g^2 in lambda-time is -sigma^2. For a process
that is not VP, sigma^2 / 2 x becomes k x with k = d log alpha / d lambda and sigma its own
(``Process.log_alpha_slope``, ``Process.rates_from_log_snr``: rectified flow, VE). It depends on
the process only through lambda, so one code path serves every schedule (discrete ones through
their continuous extension); the denoiser is queried at t = process.t_from_log_snr(lambda).

Along a solution, d log p / dlambda = -div F, hence for lambda_0 (data end) > lambda_1 (noise
end):  log p_0(x(lambda_0)) = log N(x(lambda_1); 0, I) + int_{lambda_0}^{lambda_1} div F dlambda.
The divergence is exact (D backward passes, for small D) or Hutchinson's estimate
E[z^T (dF/dx) z] with Rademacher or Gaussian probes z fixed along each trajectory (one
vector-Jacobian product per evaluation).

For 8-bit images, uniform dequantization (x + u / 127.5, u ~ U(-1/2, 1/2)) gives an upper bound
on the discrete negative log-likelihood: bits/dim <= (nll / D + log 127.5) / log 2
(:func:`bits_per_dim_dequantized`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from ..parameterization import DenoiserFn
from ..process import as_time

Trace = Literal["hutchinson", "exact"]
Probe = Literal["rademacher", "gaussian"]


class TimeOfLogSNR:
    """t(lambda) by interpolation in a dense table of the process's log-SNR (built once per
    solve; calling the process's own bisection at every ODE step costs more than the network).
    The table holds a uniform grid, a log-spaced grid near t_min where lambda -> +inf, and, for
    discrete processes, every integer step, between which lambda is linear in t."""

    def __init__(self, process: Any, n: int = 20001):
        t0, t1 = process.t_min, process.t_max
        span = t1 - t0
        grids = [torch.linspace(t0, t1, n, dtype=torch.float64),
                 t0 + span * torch.logspace(-9, 0, 2000, dtype=torch.float64)]
        if process.is_discrete:
            grids.append(torch.arange(0, int(t1) + 1, dtype=torch.float64))
        ts = torch.unique(torch.cat(grids))
        lam = process.log_snr(ts)
        keep = torch.isfinite(lam)
        # lambda decreases in t; np.interp needs increasing abscissae
        self.lam = lam[keep].flip(0).numpy()
        self.ts = ts[keep].flip(0).numpy()

    def __call__(self, lam: float) -> Tensor:
        return torch.tensor(float(np.interp(lam, self.lam, self.ts)), dtype=torch.float64)


def pf_ode_drift(denoiser: DenoiserFn, x: Tensor, lam: float, cond: Any = None,
                 time_of: TimeOfLogSNR | None = None) -> Tensor:
    """F(x, lambda) = k x - sigma / 2 eps_hat(x, t(lambda)), k = d log alpha / d lambda
    (sigma^2 / 2 for VP processes; see module docstring)."""
    process = denoiser.process
    lam_t = torch.tensor(lam, dtype=torch.float64)
    t = process.t_from_log_snr(lam_t) if time_of is None else time_of(lam)
    k = float(process.log_alpha_slope(lam_t))
    sigma = float(process.rates_from_log_snr(lam_t)[1])
    eps = denoiser(x, t.expand(x.shape[0]), cond).eps
    return k * x - 0.5 * sigma * eps


def drift_and_divergence(denoiser: DenoiserFn, x: Tensor, lam: float, cond: Any,
                         probes: Tensor | None, time_of: TimeOfLogSNR | None = None
                         ) -> tuple[Tensor, Tensor]:
    """F(x, lambda) [B, ...] and div_x F [B]: exact when ``probes`` is None, else Hutchinson's
    z^T (dF/dx) z with one probe per example."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = pf_ode_drift(denoiser, x, lam, cond, time_of)
        if probes is not None:
            (vjp,) = torch.autograd.grad(f, x, probes)
            return f.detach(), (vjp * probes).flatten(1).sum(1)
        flat = f.flatten(1)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < flat.shape[1] - 1)
            div = div + g.flatten(1)[:, i]
        return f.detach(), div


def make_probes(shape: tuple[int, ...], kind: Probe, generator: torch.Generator | None,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """Hutchinson probes with E[z z^T] = I: Rademacher (+-1) or standard Gaussian."""
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1
    raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {kind!r}")


@dataclass
class ODEResult:
    """Per-example results in nats [B]: nll = -(prior_logp + delta_logp)."""

    nll: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    nfe: int
    dims: int

    @property
    def bits_per_dim(self) -> Tensor:
        """-log p / (D log 2) of the continuous density (no dequantization offset)."""
        return self.nll / (self.dims * math.log(2))


def lambda_range(process: Any, t_start: float | None = None,
                 lambda_min: float = -20.0) -> tuple[float, float]:
    """(lambda at the data end, lambda at the noise end). The data end is t_start (default
    t_min + 1e-5 (t_max - t_min), as score-SDE's eps = 1e-5), where lambda is finite; the noise
    end is t_max, clamped to ``lambda_min`` for zero-terminal-SNR processes."""
    span = process.t_max - process.t_min
    t0 = process.t_min + 1e-5 * span if t_start is None else t_start
    lam0 = float(process.log_snr(as_time(t0)))
    lam1 = max(float(process.log_snr(as_time(process.t_max))), lambda_min)
    if not lam0 > lam1:
        raise ValueError(f"empty likelihood interval: lambda(t_start)={lam0}, "
                         f"lambda(t_max)={lam1}")
    return lam0, lam1


def ode_nll(denoiser: DenoiserFn, x: Tensor, cond: Any = None, *, trace: Trace = "hutchinson",
            probe: Probe = "rademacher", generator: torch.Generator | None = None,
            t_start: float | None = None, rtol: float = 1e-5, atol: float = 1e-5,
            method: str = "RK45") -> ODEResult:
    """-log p(x) per example [B] by integrating the probability-flow ODE with its divergence
    from the data end to the noise end (scipy ``solve_ivp``, float64 state, adaptive RK45 with
    the tolerances of Song et al. 2021), prior N(0, I) at the noise end."""
    x = x.detach().double()
    shape, B, D = x.shape, x.shape[0], int(x[0].numel())
    probes = None if trace == "exact" else make_probes(tuple(shape), probe, generator)
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'hutchinson' or 'exact', got {trace!r}")
    probes = None if probes is None else probes.to(x.device)
    lam0, lam1 = lambda_range(denoiser.process, t_start)
    time_of = TimeOfLogSNR(denoiser.process)
    nfe = 0

    def rhs(lam: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        xs = torch.from_numpy(y[:B * D]).reshape(shape).to(x.device)
        f, div = drift_and_divergence(denoiser, xs, lam, cond, probes, time_of)
        return np.concatenate([f.reshape(-1).cpu().numpy(), div.cpu().numpy()])

    y0 = np.concatenate([x.reshape(-1).cpu().numpy(), np.zeros(B)])
    sol = solve_ivp(rhs, (lam0, lam1), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE solve failed: {sol.message}")
    y1 = torch.from_numpy(sol.y[:, -1])
    z, delta = y1[:B * D].reshape(B, D), y1[B * D:]
    prior = -0.5 * (z**2).sum(1) - 0.5 * D * math.log(2 * math.pi)
    return ODEResult(nll=-(prior + delta), prior_logp=prior, delta_logp=delta, nfe=nfe, dims=D)


#: width of one 8-bit bin on difflab's [-1, 1] scale (x = u / 127.5 - 1).
BIN_WIDTH = 1.0 / 127.5


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of 8-bit data on [-1, 1]: x + (u - 1/2) / 127.5, u ~ U[0, 1)."""
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    return x.double() + (u - 0.5) * BIN_WIDTH


def bits_per_dim_dequantized(nll: Tensor, dims: int) -> Tensor:
    """Upper bound on the discrete -log2 P(u) / D from the continuous nll of dequantized data:
    -log P(u) <= E[-log p(x + noise)] - D log(bin width) (Theis et al. 2016)."""
    return (nll / dims - math.log(BIN_WIDTH)) / math.log(2)


def ode_bits_per_dim(denoiser: DenoiserFn, x: Tensor, cond: Any = None, *,
                     generator: torch.Generator | None = None, **options: Any) -> Tensor:
    """Bits/dim of 8-bit images x [B, ...] (on the [-1, 1] grid): dequantize, ``ode_nll``, and
    the bin-width offset; per example."""
    res = ode_nll(denoiser, dequantize(x, generator), cond, generator=generator, **options)
    return bits_per_dim_dequantized(res.nll, res.dims)


__all__ = ["BIN_WIDTH", "ODEResult", "TimeOfLogSNR", "bits_per_dim_dequantized", "dequantize",
           "drift_and_divergence", "lambda_range", "make_probes", "ode_bits_per_dim",
           "ode_nll", "pf_ode_drift"]
