"""DPM-Solver-v3 (Zheng et al. 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with
Empirical Model Statistics"): a multistep predictor-corrector exponential integrator whose
parameterisation is fitted to the model through the statistics l, s, b (``ems``).

In y = x / alpha and lambda = log(alpha / sigma), with L = int l, S = int s from the step's
start lambda_s, f = e^{-lambda} eps_hat - l y and g = e^{-S} f - int_{lambda_s}^{lambda}
e^{-S(r)} b(r) dr, the ODE's exact solution over a step lambda_s -> lambda_t is (eq. 9)

  y_t = e^{-L_t} [ y_s - int e^{L + S} (g(lambda) + int_{lambda_s}^{lambda} e^{-S} b) dlambda ].

Only g is approximated, by a polynomial in lambda through the g of recent evaluations
(Sec. 3.3, eq. 8); everything else is integrated numerically on the statistics (natural
cubic splines in lambda, ``ems.Spline``: L and S exactly, the remaining integrals by
Gauss-Legendre on pieces of at most ``MAX_PIECE`` in lambda between knots, accurate to
rounding). The paper's code instead snaps the grid to a fine statistics grid (1200 knots)
and uses the trapezoid rule; here any grid works and the statistics may be coarse. So a step is

  y_t = e^{-L_t} [ y_s - sum_j a_j f_j + c ],   x_t = alpha_t y_t,

with vectors a_j, c that depend only on the grid and the statistics (computed once per call).
The polynomial is the Lagrange interpolant (the Taylor derivatives of eq. 8 solved exactly)
or, "pseudo", the Newton form cut to its leading divided differences (Sec. 3.4's pseudo-order
solver). With l = 1, s = 0, b = 0 (no statistics) f = -x0_hat and this is DPM-Solver++
multistep of the same order (``dpmpp_2m`` with ``form="phi2"``, ``dpmpp_3m``).

The corrector (Sec. 3.3) redoes step i -> i+1 once f_{i+1} is known, with f_{i+1} as a node,
and keeps the model's nonlinear part N = alpha f fixed at the corrected point (as the paper's
implementation does): eps_hat there becomes (N + l x) / sigma, so f_{i+1} is unchanged and
x0_hat = (1 - l) y - f. It costs no evaluation.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..parameterization import DenoiserFn, Prediction
from .base import Callback, Generators, check_grid, report, zero_snr_start
from .ems import EMSStatistics, Spline, ems_statistics
from .options import SamplerOption, declare_options

#: Longest stretch of lambda one Gauss-Legendre rule of ``GL_NODES`` nodes covers.
MAX_PIECE = 0.5
GL_NODES = 8
#: Most interpolation nodes a step uses (order 3 with the pseudo corrector's extra node).
MAX_NODES = 4


@cache
def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    r, w = np.polynomial.legendre.leggauss(n)
    return (torch.tensor((r + 1) / 2, dtype=torch.float64),
            torch.tensor(w / 2, dtype=torch.float64))


def _pieces(a: float, c: float, knots: Tensor) -> list[tuple[float, float]]:
    """[a, c] (either order) cut at the knots inside it and into pieces <= MAX_PIECE."""
    inner = [k for k in knots.tolist() if min(a, c) < k < max(a, c)]
    cuts = [a, *sorted(inner, reverse=c < a), c]
    out = []
    for p, q in zip(cuts[:-1], cuts[1:], strict=True):
        m = max(1, math.ceil(abs(q - p) / MAX_PIECE))
        out += [(p + (q - p) * i / m, p + (q - p) * (i + 1) / m) for i in range(m)]
    return out


def _rule(a: float, c: float) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and (signed) weights for int_a^c on one smooth piece."""
    r, w = _gauss_legendre(GL_NODES)
    return a + (c - a) * r, (c - a) * w


class _Coefficients:
    """The statistics as functions of lambda, and the integrals a step needs."""

    def __init__(self, stats: EMSStatistics):
        self.st = stats
        self.knots = stats.lambdas
        self.l, self.s, self.b = (Spline(stats.lambdas, v) for v in (stats.l, stats.s, stats.b))
        self._cache: dict[tuple[float, float], tuple[Tensor, Tensor, Tensor]] = {}

    def L(self, q: Tensor) -> Tensor:  # noqa: N802 (the paper's names)
        return self.l.integral(q)

    def S(self, q: Tensor) -> Tensor:  # noqa: N802
        return self.s.integral(q)

    def _bint_integrand(self, a: float, q: Tensor) -> Tensor:
        s_a = self.S(torch.tensor([a], dtype=torch.float64))[0]
        return torch.exp(-(self.S(q) - s_a)) * self.b(q)

    def bint(self, a: float, c: float) -> Tensor:
        """int_a^c e^{-(S(r) - S(a))} b(r) dr."""
        total = torch.zeros(self.st.shape, dtype=torch.float64)
        if not bool(self.st.b.any()):
            return total
        for p, q in _pieces(a, c, self.knots):
            nodes, w = _rule(p, q)
            total = total + torch.einsum("q,q...->...", w, self._bint_integrand(a, nodes))
        return total

    def step_integrals(self, a: float, c: float, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Over the step a -> c (h = c - a), with E = L + S - (L + S)(a): the moments
        M_k = int e^E ((lambda - a) / h)^k for k < n (n <= MAX_NODES), C = int e^E
        Bint_a(lambda), and e^{-(L(c) - L(a))}; computed once per step (predictor and
        corrector share them)."""
        if (a, c) not in self._cache:
            self._cache[a, c] = self._integrals(a, c, MAX_NODES)
        moments, const, decay = self._cache[a, c]
        return moments[:n], const, decay

    def _integrals(self, a: float, c: float, n: int) -> tuple[Tensor, Tensor, Tensor]:
        h = c - a
        ends = torch.tensor([a, c], dtype=torch.float64)
        l_ends, s_a = self.L(ends), self.S(ends[:1])[0]
        moments = torch.zeros((n, *self.st.shape), dtype=torch.float64)
        const = torch.zeros(self.st.shape, dtype=torch.float64)
        partial = torch.zeros(self.st.shape, dtype=torch.float64)  # Bint_a at piece start
        b_zero = not bool(self.st.b.any())
        for p, q in _pieces(a, c, self.knots):
            nodes, w = _rule(p, q)
            ew = torch.einsum("q,q...->q...", w, torch.exp(self.L(nodes) - l_ends[0]
                                                            + self.S(nodes) - s_a))
            r = (nodes - a) / h
            moments = moments + torch.stack([torch.einsum("q,q...->...", r**k, ew)
                                             for k in range(n)])
            if not b_zero:
                const = const + (ew * self._within_piece(a, p, nodes, partial)).sum(0)
                partial = partial + torch.einsum("q,q...->...", w,
                                                 self._bint_integrand(a, nodes))
        return moments, const, torch.exp(-(l_ends[1] - l_ends[0]))

    def _within_piece(self, a: float, p: float, nodes: Tensor, partial: Tensor) -> Tensor:
        """Bint_a at each node of a piece starting at p, given Bint_a(p) = ``partial``: the
        integrand is smooth on the piece, so one rule per node from p suffices."""
        out = []
        for t in nodes.tolist():
            sub, w = _rule(p, t)
            out.append(partial + torch.einsum("q,q...->...", w, self._bint_integrand(a, sub)))
        return torch.stack(out)


def _poly_matrix(r: list[float], pseudo: bool) -> Tensor:
    """A with polynomial coefficients c = A g in powers of (lambda - a) / h through values g
    at scaled nodes r (r[0] = 0, the step's start): the Lagrange interpolant (A = V^-1), or
    pseudo: the Newton form's leading divided differences g[r_0..r_k] as the coefficient of
    r^k, dropping the cross terms (Sec. 3.4)."""
    n = len(r)
    rt = torch.tensor(r, dtype=torch.float64)
    if not pseudo:
        return torch.linalg.inv(torch.stack([rt**k for k in range(n)], 1))
    a = torch.zeros((n, n), dtype=torch.float64)
    for k in range(n):
        for j in range(k + 1):
            a[k, j] = 1.0 / math.prod(r[j] - r[m] for m in range(k + 1) if m != j)
    return a


def _step(co: _Coefficients, lam: list[float], base: int, nodes: list[int], pseudo: bool,
          end: int) -> tuple[Tensor, list[Tensor], Tensor]:
    """(e^{-dL}, [a_j], c) of y_end = e^{-dL} (y_base - sum_j a_j f_{nodes[j]} + c)."""
    a, c = lam[base], lam[end]
    h = c - a
    moments, const, decay = co.step_integrals(a, c, len(nodes))
    amat = _poly_matrix([(lam[j] - a) / h for j in nodes], pseudo)
    weights = torch.einsum("k...,kj->j...", moments, amat)
    s_a = co.S(torch.tensor([a], dtype=torch.float64))[0]
    coeffs, shift = [], -const
    for w, j in zip(weights, nodes, strict=True):
        lj = torch.tensor([lam[j]], dtype=torch.float64)
        coeffs.append(w * torch.exp(-(co.S(lj)[0] - s_a)))
        if j != base:  # g_j = e^{-(S_j - S_a)} f_j - Bint_a(lambda_j)
            shift = shift + w * co.bint(a, lam[j])
    return decay, coeffs, shift


def _orders(n_steps: int, order: int, lower_order_final: bool) -> list[int]:
    """Predictor order of each step i (of n_steps, the last going to the last noisy level):
    min(order, i + 1), and with lower_order_final at most n_steps + 1 - i (2 on the last)."""
    return [min(order, i + 1, n_steps + 1 - i) if lower_order_final else min(order, i + 1)
            for i in range(n_steps)]


def resolve_statistics(statistics: Any, denoiser: DenoiserFn, lam: Tensor,
                       generator: Generators) -> EMSStatistics:
    """The sampler's ``statistics`` option as EMSStatistics: None -> l = 1, s = b = 0; a path
    -> ``EMSStatistics.load``; a tensor of data draws -> ``ems_statistics`` at the grid's
    lambdas, each interval cut in 4 (costs evaluations of its own)."""
    if statistics is None:
        return EMSStatistics.identity()
    if isinstance(statistics, EMSStatistics):
        return statistics
    if isinstance(statistics, str | Path):
        return EMSStatistics.load(statistics)
    if isinstance(statistics, Tensor):
        knots = torch.cat([torch.linspace(float(p), float(q), 5, dtype=torch.float64)[:-1]
                           for p, q in zip(lam[:-1], lam[1:], strict=True)] + [lam[-1:]])
        gen = generator if isinstance(generator, torch.Generator) else None
        return ems_statistics(denoiser, statistics, knots, generator=gen)
    raise ValueError("dpm_solver_v3 option 'statistics' must be a path, EMSStatistics, a "
                     f"tensor of data draws or None, got {type(statistics).__name__}")


@declare_options(
    SamplerOption("order", int, 3, "order of the multistep predictor", choices=(1, 2, 3)),
    SamplerOption("statistics", str, None, "EMS statistics file (EMSStatistics.save); None: "
                  "l = 1, s = b = 0, i.e. DPM-Solver++; from Python also an EMSStatistics or "
                  "a tensor of data draws"),
    SamplerOption("corrector", bool, True, "correct each step with the new evaluation "
                  "(no extra NFE)"),
    SamplerOption("predictor_pseudo", bool, False, "pseudo-order predictor: leading divided "
                  "differences only (the paper's choice at <= 5 steps)"),
    SamplerOption("corrector_pseudo", bool, False, "pseudo-order corrector of order + 1"),
    SamplerOption("lower_order_final", bool, True, "lower the predictor order over the last "
                  "steps (at most 2 on the last)"))
@zero_snr_start
@torch.no_grad()
def dpm_solver_v3(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
                  callback: Callback | None = None, *, cond: Any = None, order: int = 3,
                  statistics: str | None = None, corrector: bool = True,
                  predictor_pseudo: bool = False, corrector_pseudo: bool = False,
                  lower_order_final: bool = True) -> Tensor:
    """DPM-Solver-v3 multistep predictor(-corrector) (module docstring), one evaluation per
    grid point but the last, which returns x0_hat (corrected as the corrector says).

    ``statistics``: a file of EMSStatistics (or, from Python, an ``EMSStatistics`` or a
    tensor of data draws to estimate them from first, which costs evaluations of its own);
    None gives DPM-Solver++ multistep of order ``order`` (with the corrector, a UniC-like
    corrector). The corrector of a step whose predictor has order p has p nodes (the
    step's two ends and p - 2 older ones), p + 1 with ``corrector_pseudo``; none when that is
    1. The paper's settings: ``predictor_pseudo`` at 5 steps, ``corrector`` at <= 6-10."""
    if order not in (1, 2, 3):
        raise ValueError(f"dpm_solver_v3 order must be 1, 2 or 3, got {order}")
    ts = check_grid(ts)
    process = denoiser.process
    lam_t = 0.5 * process.log_snr(ts)
    a = process.alpha(ts).tolist()
    lam = lam_t.tolist()
    stats = resolve_statistics(statistics, denoiser, lam_t[:-1], generator)
    co = _Coefficients(stats)
    n = len(ts) - 2  # predictor steps; then the last evaluation returns x0_hat
    p_orders = _orders(n, order, lower_order_final)
    l_at = co.l(lam_t[:-1]).to(x)
    y = x / a[0]
    f_hist: list[Tensor] = []
    y_prev = y
    for i in range(n + 1):
        pred = denoiser(a[i] * y, ts[i], cond)
        f_hist = [pred.eps / math.exp(lam[i]) - l_at[i] * y, *f_hist][:order + 1]
        if i > 0 and corrector:
            y = _correct(co, lam, i - 1, p_orders[i - 1], corrector_pseudo, y_prev, f_hist, y)
        if i == n:
            out = (1 - l_at[i]) * y - f_hist[0]
            report(callback, i, ts[i], out, Prediction(x0=out, eps=pred.eps))
            return out
        k = p_orders[i]
        decay, coeffs, shift = _to(x, *_step(co, lam, i, list(range(i, i - k, -1)),
                                             predictor_pseudo, i + 1))
        y_prev = y
        y = decay * (y - sum(cj * fj for cj, fj in zip(coeffs, f_hist, strict=False)) + shift)
        report(callback, i, ts[i], a[i + 1] * y, pred)
    raise AssertionError("unreachable")


def _to(x: Tensor, decay: Tensor, coeffs: list[Tensor], shift: Tensor
        ) -> tuple[Tensor, list[Tensor], Tensor]:
    """Step coefficients in x's dtype and device."""
    return decay.to(x), [c.to(x) for c in coeffs], shift.to(x)


def _correct(co, lam, i, p, pseudo, y_prev, f_hist, y_pred) -> Tensor:
    """Step i -> i+1 again with f_{i+1} (= f_hist[0]) as a node (Sec. 3.3)."""
    k = p + 1 if pseudo else p
    if k < 2:
        return y_pred
    nodes = [i, i + 1, *range(i - 1, i + 1 - k, -1)]
    hist = [f_hist[1], f_hist[0], *f_hist[2:k]]
    decay, coeffs, shift = _to(y_pred, *_step(co, lam, i, nodes, pseudo, i + 1))
    return decay * (y_prev - sum(cj * fj for cj, fj in zip(coeffs, hist, strict=True))
                    + shift)


__all__ = ["dpm_solver_v3", "resolve_statistics"]
