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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn, Prediction
from ..process.base import gauss_legendre
from .base import Callback, Generators, check_grid, final_step, report, zero_snr_start
from .ems import EMSStatistics, Spline, ems_statistics
from .options import SamplerOption, declare_options, final_order_option

#: Longest stretch of lambda one Gauss-Legendre rule of ``GL_NODES`` nodes covers.
MAX_PIECE = 0.5
GL_NODES = 8
#: Most interpolation nodes a step uses (order 3 with the pseudo corrector's extra node).
MAX_NODES = 4


def _pieces(a: float, c: float, knots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[a, c] (either order) cut at the knots inside it and into pieces <= MAX_PIECE, and a
    Gauss-Legendre rule on each: nodes and signed weights [pieces, GL_NODES], and each
    piece's start [pieces, 1]."""
    inner = [k for k in knots.tolist() if min(a, c) < k < max(a, c)]
    cuts = [a, *sorted(inner, reverse=c < a), c]
    ends = []
    for p, q in zip(cuts[:-1], cuts[1:], strict=True):
        m = max(1, math.ceil(abs(q - p) / MAX_PIECE))
        ends += [(p + (q - p) * i / m, p + (q - p) * (i + 1) / m) for i in range(m)]
    lo, hi = torch.tensor(ends, dtype=torch.float64).unbind(1)
    r, w = gauss_legendre(GL_NODES)
    span = (hi - lo)[:, None]
    return lo[:, None] + span * r, span * w, lo[:, None]


class _Coefficients:
    """The statistics as splines in lambda (``ems.Spline``), and the integrals a step needs.

    With L = int l, S = int s, E_a = L + S - (L + S)(a) and Bint_a(lambda) = int_a^lambda
    e^{-(S - S(a))} b, a step a -> c needs e^{-(L(c) - L(a))}, the moments int_a^c e^{E_a}
    ((lambda - a) / h)^k, C = int_a^c e^{E_a} Bint_a, and Bint_a at its other nodes."""

    def __init__(self, stats: EMSStatistics):
        self.st, self.knots = stats, stats.lambdas
        self.l, self.s, self.b = (Spline(stats.lambdas, v) for v in (stats.l, stats.s, stats.b))
        self.b_zero = not bool(stats.b.any())
        self._steps: dict[tuple[float, float], tuple[Tensor, Tensor, Tensor]] = {}
        self._intervals: dict[tuple[float, float], Tensor] = {}
        self._points: dict[float, tuple[Tensor, Tensor]] = {}

    def _S(self, q: Tensor) -> Tensor:  # noqa: N802 (the paper's names)
        return self.s.integral(q.reshape(-1)).reshape(*q.shape, *self.st.shape)

    def _L(self, q: Tensor) -> Tensor:  # noqa: N802
        return self.l.integral(q.reshape(-1)).reshape(*q.shape, *self.st.shape)

    def _b(self, q: Tensor) -> Tensor:
        return self.b(q.reshape(-1)).reshape(*q.shape, *self.st.shape)

    def at(self, lam: float) -> tuple[Tensor, Tensor]:
        """(L, S) at one lambda (remembered: the grid's points are asked for repeatedly)."""
        if lam not in self._points:
            q = torch.tensor([lam], dtype=torch.float64)
            self._points[lam] = (self._L(q)[0], self._S(q)[0])
        return self._points[lam]

    def bint(self, a: float, c: float) -> Tensor:
        """Bint_a(c) = int_a^c e^{-(S(r) - S(a))} b(r) dr."""
        if self.b_zero:
            return torch.zeros(self.st.shape, dtype=torch.float64)
        nodes, w, _ = _pieces(a, c, self.knots)
        f = torch.exp(-(self._S(nodes) - self.at(a)[1])) * self._b(nodes)
        return torch.einsum("pg,pg...->...", w, f)

    def step_integrals(self, a: float, c: float, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """(moments M_k for k < n <= MAX_NODES, C, e^{-(L(c) - L(a))}) of the step a -> c;
        computed once per step (predictor and corrector share them)."""
        if (a, c) not in self._steps:
            self._steps[a, c] = self._integrals(a, c)
        moments, const, decay = self._steps[a, c]
        return moments[:n], const, decay

    def _integrals(self, a: float, c: float) -> tuple[Tensor, Tensor, Tensor]:
        (l_a, s_a), (l_c, _) = self.at(a), self.at(c)
        nodes, w, starts = _pieces(a, c, self.knots)                  # [P, G]
        ew = _times(w, torch.exp(self._L(nodes) - l_a + self._S(nodes) - s_a))
        r = (nodes - a) / (c - a)
        moments = torch.stack([torch.einsum("pg,pg...->...", r**k, ew)
                               for k in range(MAX_NODES)])
        const = torch.zeros(self.st.shape, dtype=torch.float64)
        if not self.b_zero:
            const = torch.einsum("pg...,pg...->...", ew, self._bint_nodes(nodes, w, starts, s_a))
        return moments, const, torch.exp(-(l_c - l_a))

    def _bint_nodes(self, nodes: Tensor, w: Tensor, starts: Tensor, s_a: Tensor) -> Tensor:
        """Bint_a at every node [P, G] of the step's rule: the sum over the pieces before
        plus, within its piece, one Gauss-Legendre rule from the piece's start."""
        f = torch.exp(-(self._S(nodes) - s_a)) * self._b(nodes)
        whole = torch.einsum("pg,pg...->p...", w, f)
        before = torch.cumsum(whole, 0) - whole                      # exclusive
        r, wr = gauss_legendre(GL_NODES)
        span = nodes - starts                                        # [P, G]
        sub = starts[..., None] + span[..., None] * r                # [P, G, G]
        fs = torch.exp(-(self._S(sub) - s_a)) * self._b(sub)
        return before[:, None] + torch.einsum("pgh,pgh...->pg...", span[..., None] * wr, fs)

    def grid_bint(self, lam: list[float], i: int, j: int) -> Tensor:
        """Bint at grid point j from grid point i, summed over the grid intervals between
        them: int over [lam_k, lam_k+1] of e^{-(S - S_i)} b = e^{-(S_k - S_i)} J_k with J_k
        the interval's own integral from lam_k (each computed once)."""
        if j == i or self.b_zero:
            return torch.zeros(self.st.shape, dtype=torch.float64)
        ks, sign = (range(i, j), 1.0) if j > i else (range(j, i), -1.0)
        s_i = self.at(lam[i])[1]
        total = torch.zeros(self.st.shape, dtype=torch.float64)
        for k in ks:
            if (lam[k], lam[k + 1]) not in self._intervals:
                self._intervals[lam[k], lam[k + 1]] = self.bint(lam[k], lam[k + 1])
            total = total + torch.exp(-(self.at(lam[k])[1] - s_i)) * self._intervals[
                lam[k], lam[k + 1]]
        return sign * total


def _times(w: Tensor, v: Tensor) -> Tensor:
    """w [P, G] times v [P, G, *shape]."""
    return w.reshape(*w.shape, *([1] * (v.ndim - w.ndim))) * v


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
    s_a = co.at(a)[1]
    coeffs, shift = [], -const
    for w, j in zip(weights, nodes, strict=True):
        coeffs.append(w * torch.exp(-(co.at(lam[j])[1] - s_a)))
        # g_j = e^{-(S_j - S_a)} f_j - Bint_a(lambda_j)
        shift = shift + w * co.grid_bint(lam, base, j)
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
                  "steps (at most 2 on the last)"),
    final_order_option(1, gaussian=False))
@zero_snr_start
@torch.no_grad()
def dpm_solver_v3(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
                  callback: Callback | None = None, *, cond: Any = None, order: int = 3,
                  statistics: str | None = None, corrector: bool = True,
                  predictor_pseudo: bool = False, corrector_pseudo: bool = False,
                  lower_order_final: bool = True, final_order: int = 1) -> Tensor:
    """DPM-Solver-v3 multistep predictor(-corrector) (module docstring), one evaluation per
    grid point but the last, which returns x0_hat (corrected as the corrector says).

    ``statistics``: a file of EMSStatistics (or, from Python, an ``EMSStatistics`` or a
    tensor of data draws to estimate them from first, which costs evaluations of its own);
    None gives DPM-Solver++ multistep of order ``order`` (with the corrector, a UniC-like
    corrector). The corrector of a step whose predictor has order p has p nodes (the
    step's two ends and p - 2 older ones), p + 1 with ``corrector_pseudo``; none when that is
    1. The paper's settings: ``predictor_pseudo`` at 5 steps, ``corrector`` at <= 6-10.
    ``final_order`` > 1: the last step to sigma = 0 is the shared Adams-Bashforth step in
    sigma~ (``base.final_step``) through the latest eps_hat (as corrected)."""
    if order not in (1, 2, 3):
        raise ValueError(f"dpm_solver_v3 order must be 1, 2 or 3, got {order}")
    ts = check_grid(ts)
    process = denoiser.process
    lam_t = 0.5 * process.log_snr(ts)
    a = process.alpha(ts).tolist()
    lam = lam_t.tolist()
    stats = resolve_statistics(statistics, denoiser, lam_t[:-1], generator)
    if stats.shape not in ((), tuple(x.shape[1:])):
        raise ValueError(f"dpm_solver_v3: statistics of shape {stats.shape} do not match "
                         f"samples of shape {tuple(x.shape[1:])}")
    co = _Coefficients(stats)
    n = len(ts) - 2  # predictor steps; then the last evaluation returns x0_hat
    p_orders = _orders(n, order, lower_order_final)
    l_at = co.l(lam_t[:-1]).to(x)
    y = x / a[0]
    f_hist: list[Tensor] = []
    eps_hist: list[Tensor] = []  # eps_hat as corrected, (N + l x) / sigma, for final_order
    y_prev = y
    for i in range(n + 1):
        pred = denoiser(a[i] * y, ts[i], cond)
        f_hist = [pred.eps / math.exp(lam[i]) - l_at[i] * y, *f_hist][:order + 1]
        if i > 0 and corrector:
            y = _correct(co, lam, i - 1, p_orders[i - 1], corrector_pseudo, y_prev, f_hist, y)
        if i == n:
            eps = math.exp(lam[i]) * (f_hist[0] + l_at[i] * y)
            eps_hist = [eps, *eps_hist][:final_order]
            fixed = Prediction(x0=(1 - l_at[i]) * y - f_hist[0], eps=eps)
            return final_step(callback, i, ts[i], fixed, a[i] * y, a[i],
                              (-lam_t).exp().tolist(), eps_hist)
        if final_order > 1:
            eps_hist = [math.exp(lam[i]) * (f_hist[0] + l_at[i] * y), *eps_hist][:final_order]
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
