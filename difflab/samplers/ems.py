"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al. 2023, Sec. 3.1-3.2).

Write y = x / alpha and lambda = log(alpha / sigma) (half the log-SNR, as in ``expint``). The
probability-flow ODE is dy/dlambda = -e^{-lambda} eps_hat(x, lambda), and DPM-Solver-v3 splits
it with three functions of lambda, each a vector of the data's shape (products elementwise):

- l(lambda): the linear part, N = sigma eps_hat - l x the rest. The paper's eq. 6 picks the l
  that makes N least sensitive to x, argmin_l E ||grad_x N||_F^2, i.e. l = E[diag(grad_x
  sigma eps_hat)] over x ~ p_lambda (l = 1 everywhere is data prediction, DPM-Solver++).
- s(lambda), b(lambda): with f = N / alpha = e^{-lambda} eps_hat - l y and f' = df/dlambda
  its total derivative along the ODE, the paper's eq. 7 picks argmin_{s,b} E ||f' - s f -
  b||^2 (a least-squares line per entry): s = Cov(f', f) / Var(f), b = E f' - s E f. Then
  g = e^{-int s} f - int e^{-int s} b changes as little as possible along the ODE, and the
  solver extrapolates g instead of x0_hat (``dpm_solver_v3``).

``ems_statistics`` estimates them on draws x = alpha x0 + sigma z of the forward process from
data x0 (the paper's stand-in for the model's own marginals), with central finite
differences: the diagonal of the Jacobian by Hutchinson's estimator E_v[v * (J v)] with
Rademacher v (exact for a diagonal Jacobian), and f' by stepping along the ODE tangent.
``EMSStatistics`` holds them on a grid of lambda knots; between knots the solver uses their
natural cubic spline in lambda (``Spline``), outside the end values. ``save`` / ``load``
use safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import LoadError, atomic_write, read_safetensors
from ..parameterization import DenoiserFn
from .grids import default_sigma_min


@dataclass(frozen=True)
class EMSStatistics:
    """l, s, b (each [M, *shape], float64) at M increasing lambda knots ``lambdas``."""

    lambdas: Tensor
    l: Tensor  # noqa: E741 (the paper's name)
    s: Tensor
    b: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lam = self.lambdas
        if lam.ndim != 1 or lam.numel() < 2 or not bool((lam[1:] > lam[:-1]).all()):
            raise ValueError("EMS statistics: lambdas must be 1-D, strictly increasing, with "
                             f"at least 2 knots (got shape {tuple(lam.shape)})")
        for name in ("l", "s", "b"):
            v = getattr(self, name)
            if v.shape != self.l.shape or v.shape[:1] != lam.shape:
                raise ValueError(f"EMS statistics: {name} has shape {tuple(v.shape)}, expected "
                                 f"[{lam.numel()}, ...] like l {tuple(self.l.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"EMS statistics: {name} is not finite")

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-example shape the statistics broadcast against (() for scalars)."""
        return tuple(self.l.shape[1:])

    @classmethod
    def identity(cls, shape: tuple[int, ...] = ()) -> EMSStatistics:
        """l = 1, s = 0, b = 0: with these DPM-Solver-v3 is DPM-Solver++ (data prediction)."""
        lam = torch.tensor([-1.0, 1.0], dtype=torch.float64)
        one = torch.ones((2, *shape), dtype=torch.float64)
        return cls(lam, one, torch.zeros_like(one), torch.zeros_like(one),
                   {"kind": "identity"})

    def save(self, path: str | Path) -> Path:
        """Write lambdas, l, s, b as a safetensors file (``meta`` as JSON in its header)."""
        from safetensors.torch import save_file

        tensors = {k: getattr(self, k).contiguous() for k in ("lambdas", "l", "s", "b")}
        meta = {"format": "difflab.ems/1", "meta": json.dumps(self.meta)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> EMSStatistics:
        """Read a file written by ``save``; a LoadError naming the file if it is not one."""
        from safetensors import safe_open

        tensors = read_safetensors(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            if header.get("format") != "difflab.ems/1":
                raise ValueError("not written by EMSStatistics.save")
            return cls(*(tensors[k].to(torch.float64) for k in ("lambdas", "l", "s", "b")),
                       json.loads(header.get("meta", "{}")))
        except (KeyError, ValueError) as e:
            raise LoadError(f"{path} is not an EMS statistics file: {e}") from None


class Spline:
    """The natural cubic spline through (knots, values) ([M], [M, *shape]) in lambda, held at
    the end values outside the knots, and its exact antiderivative. Smooth (C^2) statistics
    keep g smooth, which the solver's polynomial steps need to reach their order (a
    piecewise-linear l gives g kinks that cap it at 2)."""

    def __init__(self, knots: Tensor, values: Tensor):
        self.knots, self.v = knots, values
        h = knots.diff()
        self.h = _col(h, values)
        m = torch.zeros_like(values)  # second derivatives; natural: 0 at both ends
        if knots.numel() > 2:
            n = knots.numel() - 2
            tri = torch.diag(2 * (h[:-1] + h[1:])) + torch.diag(h[1:-1], 1) + torch.diag(
                h[1:-1], -1)
            slope = values.diff(dim=0) / self.h
            rhs = 6 * slope.diff(dim=0)
            m[1:-1] = torch.linalg.solve(tri, rhs.reshape(n, -1)).reshape(rhs.shape)
        self.m = m
        self.b = values.diff(dim=0) / self.h - self.h * (2 * m[:-1] + m[1:]) / 6
        full = self._piece_integral(torch.arange(knots.numel() - 1), self.h)
        self.cum = torch.cat([torch.zeros_like(values[:1]), torch.cumsum(full, 0)])

    def _locate(self, q: Tensor) -> tuple[Tensor, Tensor]:
        qc = q.clamp(float(self.knots[0]), float(self.knots[-1]))
        j = (torch.searchsorted(self.knots, qc, right=True) - 1).clamp(0, self.knots.numel() - 2)
        return j, _col(qc - self.knots[j], self.v)

    def _piece_integral(self, j: Tensor, t: Tensor) -> Tensor:
        return (self.v[j] * t + self.b[j] * t**2 / 2 + self.m[j] * t**3 / 6
                + (self.m[j + 1] - self.m[j]) / self.h[j] * t**4 / 24)

    def __call__(self, q: Tensor) -> Tensor:
        """Values at q ([Q] -> [Q, *shape])."""
        j, t = self._locate(q)
        return (self.v[j] + self.b[j] * t + self.m[j] * t**2 / 2
                + (self.m[j + 1] - self.m[j]) / self.h[j] * t**3 / 6)

    def integral(self, q: Tensor) -> Tensor:
        """int_{knots[0]}^{q} of the spline (held constant beyond the ends), [Q, *shape]."""
        j, t = self._locate(q)
        below = _col((q - self.knots[0]).clamp(max=0), self.v) * self.v[0]
        above = _col((q - self.knots[-1]).clamp(min=0), self.v) * self.v[-1]
        return self.cum[j] + self._piece_integral(j, t) + below + above


def _col(v: Tensor, like: Tensor) -> Tensor:
    """[Q] -> [Q, 1, ..., 1] to broadcast against [Q, *shape]."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def ems_lambdas(process, n: int = 64, sigma_min: float | None = None) -> Tensor:
    """n knots evenly spaced in lambda from lambda(t_max) to the least noisy level sigma~_min
    (``grids.default_sigma_min`` unless given): a default grid for ``ems_statistics``."""
    if n < 2:
        raise ValueError(f"EMS statistics need at least 2 lambda knots, got {n}")
    lo = 0.5 * float(process.log_snr(process.t_max))
    hi = -math.log(sigma_min if sigma_min is not None else default_sigma_min(process))
    return torch.linspace(lo, hi, n, dtype=torch.float64)


@torch.no_grad()
def ems_statistics(denoiser: DenoiserFn, data: Tensor, lambdas: Tensor | int = 64, *,
                   generator: torch.Generator | None = None, fd_step: float = 1e-3,
                   shared: bool = False, ridge: float = 1e-9, s_max: float = 10.0,
                   batch_size: int = 1024, cond: Any = None) -> EMSStatistics:
    """Estimate l, s, b (module docstring) at the lambda knots ``lambdas`` (increasing; an int
    n: ``ems_lambdas(process, n)``) from data draws ``data`` [n, *shape].

    Each knot sees x = alpha x0 + sigma z, with the same z and one Rademacher probe v per
    draw at every knot (so the estimates are smooth in lambda).
    Derivatives are central differences: in x with step ``fd_step`` * sigma along v, in lambda
    with step ``fd_step``; l' (needed in f') differentiates the estimate of l with the same
    x0, z, v (common random numbers). ``shared``: one scalar l and s per knot (their mean
    over entries), b still per entry (fewer draws suffice). ``ridge`` regularises s where f
    does not vary over the draws (``_line_fit``), and s is clipped to [-s_max, s_max] (b
    refitted for the clipped s): any s gives the same exact solution, but the solver
    integrates e^{+-int s}, which overflows for the |s| of thousands an untrained network can
    show; s of trained models and exact mixtures stays within a few units. Cost: 9
    evaluations per draw and knot. ``cond`` is passed to the denoiser (one condition for all
    draws)."""
    process = denoiser.process
    lam = ems_lambdas(process, lambdas) if isinstance(lambdas, int) else torch.as_tensor(
        lambdas, dtype=torch.float64)
    if lam.ndim != 1 or lam.numel() < 2 or not bool((lam[1:] > lam[:-1]).all()):
        raise ValueError("ems_statistics: lambdas must be 1-D and strictly increasing")
    if data.ndim < 2 or data.shape[0] < 2:
        raise ValueError(f"ems_statistics: data must be [n >= 2, ...] draws, got shape "
                         f"{tuple(data.shape)}")
    if not fd_step > 0:
        raise ValueError(f"ems_statistics: fd_step must be > 0, got {fd_step}")
    if not ridge >= 0:
        raise ValueError(f"ems_statistics: ridge must be >= 0, got {ridge}")
    if not s_max > 0:
        raise ValueError(f"ems_statistics: s_max must be > 0, got {s_max}")
    x0 = data.to(torch.float64)
    ls, ss, bs = [], [], []
    # the same z and v at every knot (common random numbers): the estimates are then smooth
    # functions of lambda, as the solver's interpolation between knots assumes
    z = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    v = (torch.randint(0, 2, x0.shape, generator=generator) * 2 - 1).to(x0)
    lo, hi = sorted(0.5 * float(process.log_snr(t)) for t in (process.t_min, process.t_max))
    for lam_m in lam.tolist():
        # the stencil reaches lam -+ 2 fd_step: keep it inside the process's range (a knot at
        # t_max is estimated 2 fd_step inside it; the statistics are smooth)
        lam_m = min(max(lam_m, lo + 2 * fd_step), hi - 2 * fd_step)
        batches = [_knot_terms(denoiser, x0[i:i + batch_size], z[i:i + batch_size],
                               v[i:i + batch_size], lam_m, fd_step, shared, cond)
                   for i in range(0, x0.shape[0], batch_size)]
        l_m, f, f1 = _finish_knot(batches, fd_step, shared)
        s_m, b_m = _line_fit(f, f1, shared, ridge, s_max)
        ls.append(l_m.expand(x0.shape[1:]))
        ss.append(s_m.expand(x0.shape[1:]))
        bs.append(b_m)
    meta = {"draws": int(x0.shape[0]), "fd_step": fd_step, "shared": shared, "ridge": ridge,
            "s_max": s_max,
            "process": process.to_config() if hasattr(process, "to_config") else None}
    return EMSStatistics(lam, *(torch.stack(v).cpu() for v in (ls, ss, bs)), meta)


def _eps(denoiser, x: Tensor, lam: float, cond: Any) -> Tensor:
    t = denoiser.process.t_from_log_snr(torch.tensor(2 * lam, dtype=torch.float64))
    return denoiser(x, t, cond).eps.to(torch.float64)


def _alpha_sigma(process, lam: float) -> tuple[float, float]:
    t = process.t_from_log_snr(torch.tensor(2 * lam, dtype=torch.float64))
    a, s = process.alpha_sigma(t)
    return float(a), float(s)


def _diag_jac(denoiser, x0, z, v, lam, fd_step, cond) -> Tensor:
    """Per draw, v * (grad_x (sigma eps_hat)) v at x = alpha x0 + sigma z (central
    difference with step fd_step * sigma); its mean over draws is diag E[grad sigma eps]."""
    a, s = _alpha_sigma(denoiser.process, lam)
    x, h = a * x0 + s * z, fd_step * s
    return v * s * (_eps(denoiser, x + h * v, lam, cond) - _eps(denoiser, x - h * v, lam,
                                                                  cond)) / (2 * h)


def _knot_terms(denoiser, x0, z, v, lam, fd_step, shared, cond) -> tuple[Tensor, ...]:
    """Per draw at knot lam: the Hutchinson terms for l at lam and lam -+ fd_step, and the
    pieces of f and f' that do not need l yet (e^{-lam} eps, its ODE derivative, y)."""
    process = denoiser.process
    jac = [_diag_jac(denoiser, x0, z, v, lam + d, fd_step, cond)
           for d in (0.0, -fd_step, fd_step)]
    a, s = _alpha_sigma(process, lam)
    x = a * x0 + s * z
    y = x / a
    q0 = math.exp(-lam) * _eps(denoiser, x, lam, cond)  # e^{-lam} eps = -dy/dlambda
    qs = []
    for d in (-fd_step, fd_step):  # along the ODE tangent: y(lam + d) = y - d q0
        a_d, _ = _alpha_sigma(process, lam + d)
        qs.append(math.exp(-(lam + d)) * _eps(denoiser, a_d * (y - d * q0), lam + d, cond))
    dq = (qs[1] - qs[0]) / (2 * fd_step)
    return (*jac, y, q0, dq)


def _mean_over(t: Tensor, shared: bool) -> Tensor:
    """Mean over draws ([n, *shape] -> [*shape]), and over entries too when shared (-> [])."""
    return t.mean() if shared else t.mean(0)


def _finish_knot(batches, fd: float, shared: bool) -> tuple[Tensor, Tensor, Tensor]:
    """l at the knot, and f, f' per draw: f = e^{-lam} eps - l y, f' = d(e^{-lam} eps) - l' y
    + l e^{-lam} eps (the ODE gives dy/dlambda = -e^{-lam} eps)."""
    cat = [torch.cat([b[k] for b in batches]) for k in range(6)]
    j0, jm, jp, y, q0, dq = cat
    l_m = _mean_over(j0, shared)
    dl = (_mean_over(jp, shared) - _mean_over(jm, shared)) / (2 * fd)
    f = q0 - l_m * y
    f1 = dq - dl * y + l_m * q0
    return l_m, f, f1


def _line_fit(f: Tensor, f1: Tensor, shared: bool, ridge: float, s_max: float
              ) -> tuple[Tensor, Tensor]:
    """The least-squares line f' ~ s f + b over draws (per entry, or one s when shared), with
    a ridge on s: s = Cov(f', f) / (Var f + ridge E[f^2]), b = E f' - s E f. Where f hardly
    varies the line is not determined (eq. 7's minimum is attained by any s) and the plain
    ratio of two rounding-level moments is arbitrary, so s -> 0 and b -> E f' there (a
    constant f, as for Gaussian data, gives s = 0 to rounding); where f varies the ridge
    changes s by about ``ridge`` E[f^2] / Var f relative (the default 1e-9 nowhere near
    matters: a ridge of 1e-3 already cost accuracy on the family benchmark)."""
    fc, f1c = f - f.mean(0), f1 - f1.mean(0)
    cov, var = _mean_over(fc * f1c, shared), _mean_over(fc * fc, shared)
    s = (cov / (var + ridge * _mean_over(f * f, shared) + 1e-300)).clamp(-s_max, s_max)
    return s, f1.mean(0) - s * f.mean(0)


__all__ = ["EMSStatistics", "Spline", "ems_lambdas", "ems_statistics"]
