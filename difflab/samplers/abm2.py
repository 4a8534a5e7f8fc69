"""Adaptive two-step Adams predictor-corrector on the PF ODE dq/dw = x0_hat(v), w = w_c sinh(v):
``rk45``'s ``method="ABM2"``, one network evaluation per step.

Each step from v_n to v_{n+1} = v_n + h integrates x0_hat exactly in w with x0_hat linear in v
(the Adams idea, Hairer, Norsett & Wanner, "Solving ODEs I", III.1, on the data-prediction
form of Lu et al. 2022b, eq. 9):

    q_{n+1} = q_n + x0_n (w_{n+1} - w_n) + D I,   I = int_{v_n}^{v_{n+1}} (v - v_n) dw
            = w_c (h sinh v_{n+1} - cosh v_{n+1} + cosh v_n),

with D the slope (x0_n - x0_{n-1}) / (v_n - v_{n-1}) through the previous point for the
predictor (Adams-Bashforth 2; D = 0, i.e. DDIM, on the first step) and (x0_{n+1} - x0_n) / h
through x0_{n+1} = x0_hat at the predicted point for the corrector (the trapezoid, Adams-Moulton
2). The corrected value is kept without evaluating again (PEC mode, as UniPC's corrector, Zhao
et al. 2023). Both are exact where x0_hat is constant, as at the two ends of the flow.

The local error estimate is the predictor-corrector difference (D_p - D_c) I (Milne's device,
Hairer et al. III.7), normed as RMS of it / (atol + rtol |q|); a step with norm <= 1 is
accepted and the next is h * clip(0.9 err^(-1/p), 0.2, 5), p = 3 (p = 2 after the Euler first
step). A rejection costs one evaluation. The first step is sqrt(tol) ||q0|| / ||dq/dv|| from
the first evaluation. ``max_nfe``: once one evaluation is left, the step goes to the end, is
accepted, and its predictor is the DDIM step (D = 0): extrapolating the slope over what is left
of the span made the result blow up (RMS 15 at 10 NFE on a 16-d anisotropic mixture, against
0.16 with the DDIM predictor).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _rms(t: Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def abm2_solve(x0_fn: Callable[[float, Tensor], Tensor], v0: float, v1: float, q0: Tensor,
               knee: float, *, rtol: float, atol: float, max_nfe: int | None = None,
               on_step: Callable[[float, Tensor], None] | None = None) -> tuple[Tensor, int]:
    """Integrate dq/dv = knee cosh(v) x0_fn(v, q) from v0 to v1 (either direction); returns
    (q(v1), NFE). The last call of ``x0_fn`` is at v1. ``on_step(v, q)`` sees accepted steps.
    ``max_nfe`` (>= 2) caps the evaluations; the run still ends at v1."""
    if max_nfe is not None and max_nfe < 2:
        raise ValueError(f"option 'max_nfe' must be >= 2 for method ABM2, got {max_nfe}")
    sign = 1.0 if v1 >= v0 else -1.0
    v, q, x0 = v0, q0, x0_fn(v0, q0)
    nfe, prev = 1, None
    slope = knee * math.cosh(v0) * _rms(x0)
    tol = max(rtol, atol)
    h = abs(v1 - v0) if slope <= 1e-12 else math.sqrt(tol) * max(_rms(q0), atol) / slope
    while sign * (v1 - v) > 1e-12 * max(1.0, abs(v1)):
        left = abs(v1 - v)
        forced = max_nfe is not None and max_nfe - nfe <= 1
        h = left if forced else min(h, left)
        v_new = v1 if h == left else v + sign * h
        dw = knee * (math.sinh(v_new) - math.sinh(v))
        integral = knee * ((v_new - v) * math.sinh(v_new) - math.cosh(v_new) + math.cosh(v))
        d_pred = 0.0 if prev is None or forced else (x0 - prev[1]) / (v - prev[0])
        q_pred = q + x0 * dw + d_pred * integral
        x0_new = x0_fn(v_new, q_pred)
        nfe += 1
        q_corr = q + x0 * dw + (x0_new - x0) / (v_new - v) * integral
        scale = atol + rtol * torch.maximum(q.abs(), q_pred.abs())
        err = _rms((q_pred - q_corr) / scale)
        order = 2.0 if prev is None else 3.0
        if err <= 1.0 or forced:
            prev, v, q, x0 = (v, x0), v_new, q_corr, x0_new
            if on_step is not None:
                on_step(v, q)
        h *= 5.0 if err == 0.0 else min(5.0, max(0.2, 0.9 * err ** (-1.0 / order)))
    return q, nfe


__all__ = ["abm2_solve"]
