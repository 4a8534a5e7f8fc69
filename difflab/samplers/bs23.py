"""Embedded Bogacki-Shampine 3(2) pair in torch (Bogacki & Shampine 1989, "A 3(2) pair of
Runge-Kutta formulas"), with an NFE budget: ``rk45``'s ``method="BS23"``.

Tableau (c; a; b of the 3rd-order solution; b* of the embedded 2nd-order one):

    c = (0, 1/2, 3/4, 1),  a21 = 1/2,  a32 = 3/4,  b = (2/9, 1/3, 4/9, 0),
    b* = (7/24, 1/4, 1/3, 1/8),

the fourth stage being the right-hand side at the new point, which is the next step's first
(first same as last, FSAL): 3 evaluations per step, plus 1 at the start. The error estimate is
y - y* = h sum (b - b*)_i k_i; its norm is the RMS over elements of it / (atol + rtol |y|)
(Hairer, Norsett & Wanner, "Solving ODEs I", II.4, eq. 4.11), and the next step is
h * clip(0.9 err^(-1/3), 0.2, 5).

First step from the first evaluation only: scipy's estimate (Hairer et al. II.4) spends an
evaluation on the second derivative; here h0 = tol^(1/3) * ||y0|| / ||f0|| (the step over
which the first-order change is tol^(1/3) of the state, the step an error of order h^3 relative
to the state would allow at unit curvature scale), capped at the whole span.

``max_nfe``: when the remaining budget buys only one more step ((max_nfe - used) // 3 = 1), that
step goes to the end and is accepted whatever its error, so the run ends at the target within
the budget. (Forcing earlier steps to at least (remaining span) / (steps left) was tried: on
anisotropic mixtures it made the first step cross w = 6e-3..10 at once and doubled the error.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

_ERR = (-5.0 / 72.0, 1.0 / 12.0, 1.0 / 9.0, -1.0 / 8.0)  # b - b*


def _norm(e: Tensor, y0: Tensor, y1: Tensor, rtol: float, atol: float) -> float:
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    return float((e / scale).pow(2).mean().sqrt())


def _first_step(y0: Tensor, f0: Tensor, span: float, rtol: float, atol: float) -> float:
    """Initial step size from y0 and f0 = f(v0, y0) alone (module docstring)."""
    d0 = float(y0.pow(2).mean().sqrt())
    d1 = float(f0.pow(2).mean().sqrt())
    if d1 <= 1e-12:
        return span
    h0 = max(rtol, atol) ** (1.0 / 3.0) * max(d0, atol) / d1
    return min(h0, span)


def bs23_solve(f: Callable[[float, Tensor], Tensor], v0: float, v1: float, y0: Tensor, *,
               rtol: float, atol: float, max_nfe: int | None = None,
               on_step: Callable[[float, Tensor], None] | None = None
               ) -> tuple[Tensor, Tensor, int]:
    """Integrate dy/dv = f(v, y) from v0 to v1 (either direction) with the adaptive BS 3(2)
    pair. Returns (y(v1), f(v1, y(v1)), NFE). ``on_step(v, y)`` sees every accepted step.
    ``max_nfe`` (>= 4) caps the evaluations; the run then still ends at v1."""
    if max_nfe is not None and max_nfe < 4:
        raise ValueError(f"option 'max_nfe' must be >= 4 for method BS23, got {max_nfe}")
    direction = 1.0 if v1 >= v0 else -1.0
    v, y = v0, y0
    k1 = f(v, y)
    nfe = 1
    h = _first_step(y, k1, abs(v1 - v0), rtol, atol)
    while direction * (v1 - v) > 1e-12 * max(1.0, abs(v1)):
        left = abs(v1 - v)
        forced = False
        if max_nfe is not None:
            m = (max_nfe - nfe) // 3
            if m <= 1:  # the last affordable step goes to the end and is accepted
                h, forced = left, True
        h = min(h, left)
        hs = direction * h
        k2 = f(v + 0.5 * hs, y + 0.5 * hs * k1)
        k3 = f(v + 0.75 * hs, y + 0.75 * hs * k2)
        v_new = v1 if h == left else v + hs
        y_new = y + hs * (2.0 / 9.0 * k1 + 1.0 / 3.0 * k2 + 4.0 / 9.0 * k3)
        k4 = f(v_new, y_new)
        nfe += 3
        e = hs * (_ERR[0] * k1 + _ERR[1] * k2 + _ERR[2] * k3 + _ERR[3] * k4)
        err = _norm(e, y, y_new, rtol, atol)
        factor = 5.0 if err == 0.0 else min(5.0, max(0.2, 0.9 * err ** (-1.0 / 3.0)))
        if err <= 1.0 or forced:
            v, y, k1 = v_new, y_new, k4
            if on_step is not None:
                on_step(v, y)
            if err > 1.0:
                factor = 1.0
        h = h * factor
        if not math.isfinite(h) or h <= 0.0:
            raise RuntimeError("rk45 (BS23) step size underflow")
    return y, k1, nfe


__all__ = ["bs23_solve"]
