"""UniPC: a unified predictor-corrector of any order (Zhao et al. 2023, Alg. 2 and 3), on the
data-prediction (DPM-Solver++) base.

Predictor UniP-p: x~_t = (sigma_t/sigma_s) x_s + alpha_t [h phi_1(-h) m_0 + B(h) sum a_m D_m / r_m]
with D_m = m_m - m_0 the differences to earlier outputs at lambda offsets r_m h. Corrector
UniC-p: the same formula with the new output m_t = D(x~_t, t) added as a node (r = 1); it costs
no extra evaluation because m_t is reused by the next step. With one difference the paper
sets a_1 = 1/2 and B(h) decides the method: bh1 B(h) = h, bh2 B(h) = e^h - 1 (eq. 8-9, with
h -> -h for data prediction). With more differences a solves the order conditions exactly and
B(h) cancels; that is the exact integral of the interpolating polynomial (``expint``).
All of it holds for h < 0: on a rising grid (inversion) UniPC runs upwards, the last step
predictor-only (no evaluation at ts[-1] to correct with), and returns x at ts[-1].
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from .base import (
    Callback,
    Generators,
    check_ode_grid,
    final_step,
    report,
    two_point_fit,
    zero_snr_start,
)
from .expint import half_log_snr_grid, lagrange_weights
from .grids import noisy_end_grid
from .options import SamplerOption, declare_options, final_order_option, gaussian_fit_option


def _weights(nodes: list[float], h: float, variant: str) -> list[float]:
    """Weights on m at ``nodes`` (lambda offsets, nodes[0] = 0) of int_0^h e^{-(h-u)} m du / h."""
    if len(nodes) != 2:
        return lagrange_weights(nodes, h, 1.0)
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    w0 = -math.expm1(-h) / h
    r = nodes[1] / h
    # -alpha_t B(h) * (1/2) * (m_1 - m_0) / r, divided by alpha_t h
    c = -b_h * 0.5 / r / h
    return [w0 - c, c]


#: Below this many steps the last predictor step is first order (``lower_order_final``), the
#: threshold of DPM-Solver++'s and diffusers' "lower order final" steps (Lu et al. 2022b).
LOWER_ORDER_FINAL_STEPS = 15


def _plan(lam: Tensor, order: int, variant: str, rising: bool = False,
          lower_final: bool = False, taper: bool = False) -> list[tuple[list[float], list[float]]]:
    """Per step i < N-1 (i < N on a rising grid): predictor weights on m_i, m_{i-1}, ... and
    corrector weights on m_{i+1}, m_i, m_{i-1}, ... (both to be multiplied by alpha_{i+1} h).
    With ``lower_final`` the last step is first order; with ``taper`` step i of n has order at
    most n - i (the last one first order, the one before at most second order)."""
    plan = []
    n = len(lam) - (1 if rising else 2)
    for i in range(n):
        h = float(lam[i + 1] - lam[i])
        k = 1 if lower_final and i == n - 1 else min(order, i + 1)
        if taper:
            k = min(k, n - i)
        hist = [float(lam[i - j] - lam[i]) for j in range(k)]
        pred_w = _weights(hist, h, variant)
        corr_nodes = [0.0, h] + hist[1:k]  # m_i, m_{i+1}, older: order k + 1
        cw = _weights(corr_nodes, h, variant)
        plan.append((pred_w, [cw[1], cw[0], *cw[2:]]))
    return plan


def _order(default: int) -> SamplerOption:
    return SamplerOption("order", int, default, "order p of the UniP predictor (the UniC "
                         "corrector has p + 1)", min=1)


def _lower_order_final() -> SamplerOption:
    return SamplerOption("lower_order_final", bool, False, "below "
                         f"{LOWER_ORDER_FINAL_STEPS} steps, take the last step to the last "
                         "noisy level first order and end with x0_hat there (final_order 1)")


def _noisy_end() -> SamplerOption:
    return SamplerOption("noisy_end", bool, False, "end at a noisy level: the grid's last "
                         "time or, where that is sigma = 0, the process's first level; step to "
                         "it like the others (order tapering to 1 on the last step) and return "
                         "x there, not x0_hat (diffusers' sigma_min end)")


@declare_options(
    _order(2),
    SamplerOption("variant", str, "bh2", "B(h): bh1 = h, bh2 = e^h - 1",
                  choices=("bh1", "bh2")),
    SamplerOption("corrector", bool, True, "apply the UniC corrector (false: plain UniP)"),
    final_order_option(1), _lower_order_final(), _noisy_end(), gaussian_fit_option())
@zero_snr_start
@torch.no_grad()
def unipc(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
          callback: Callback | None = None, *, cond: Any = None, order: int = 2,
          variant: Literal["bh1", "bh2"] = "bh2", corrector: bool = True,
          final_order: int = 1, lower_order_final: bool = False,
          noisy_end: bool = False, gaussian_fit: str = "eps_ratio") -> Tensor:
    """UniPC-p (Zhao et al. 2023): UniP-``order`` predictor and UniC corrector (order + 1);
    ``corrector=False`` gives the plain UniP multistep predictor; ``final_order`` > 1 makes the
    last step an Adams-Bashforth step in sigma~ to clean data (``base.final_step``), 0 the
    local-Gaussian step, fitted as ``gaussian_fit`` says.

    ``lower_order_final`` (off by default): on a sampling grid of fewer than
    ``LOWER_ORDER_FINAL_STEPS`` steps, the step to the last noisy level is first order and
    the result is x0_hat there, whatever ``final_order`` says (the "lower order final" steps
    of DPM-Solver++ and diffusers). Few steps span orders of magnitude of sigma~ near the
    data, where x0_hat changes fastest, and the high-order extrapolation of x0_hat in lambda
    (or of eps_hat in sigma~ for the final step) from the older, much noisier outputs is
    worse than none: on 64-d anisotropic mixtures (DDPM linear) at 5 NFE it cut unipc_bh1's
    error from 1.2 to 0.23 on the Karras grid and from 0.80 to 0.57 on the log-SNR grid, and
    final_order=3 raised the error on the trailing grid from 0.20 to 0.34. It is off by
    default because on the held-out problems of ``benchmarks/sampler_family.py`` (trailing
    grids) it made unipc_bh1 / bh2 less accurate than diffusers' UniPC at 5-10 NFE (median
    ratio 1.09-1.17 against 0.83-0.90 without it).

    ``noisy_end`` (off by default): the run ends at the grid's last noisy level
    (``grids.noisy_end_grid``: a grid ending at sigma = 0 ends at the process's first level
    instead); it is a rising-style one
    that steps down to ts[-1] and returns the (slightly noisy) x there, each step i of n of
    order at most n - i, so the last step is a first-order UniP (DDIM) step and the corrector
    applies up to the last evaluation. With ts[-1] the first level of a 1000-level table this is
    the end of diffusers' UniPC with ``final_sigmas_type="sigma_min"`` and
    ``lower_order_final``."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    two_point = two_point_fit(gaussian_fit)
    ts, rising = check_ode_grid(ts, denoiser.process)
    if noisy_end and not rising:
        ts = noisy_end_grid(denoiser.process, ts)
        rising = True  # step to ts[-1] like every other level (the plan covers all steps)
    lam, a, s = half_log_snr_grid(denoiser.process, ts)
    lower_final = lower_order_final and not rising and len(ts) - 1 < LOWER_ORDER_FINAL_STEPS
    if lower_final:
        final_order = 1
    plan = _plan(lam, order, variant, rising, lower_final, taper=noisy_end)
    hist: list[Tensor] = []
    eps_hist: list[Tensor] = []
    x_prev = None
    for i in range(len(ts) - 1):
        pred = denoiser(x, ts[i], cond)
        eps_hist = [pred.eps, *eps_hist][:final_order or 2]
        if corrector and i > 0:  # UniC on the step i-1 -> i, reusing m_i
            scale = float(a[i] * (lam[i] - lam[i - 1]))
            cw = plan[i - 1][1]
            x = float(s[i] / s[i - 1]) * x_prev
            for wj, mj in zip(cw, [pred.x0, *hist], strict=False):
                x = x + scale * wj * mj
        if i == len(ts) - 2 and not rising:
            return final_step(callback, i, ts[i], pred, x, float(a[i]), (-lam).exp().tolist(),
                              eps_hist, gaussian=final_order == 0,
                              x0_prev=hist[0] if hist and two_point else None)
        hist = [pred.x0, *hist][:order]
        pw = plan[i][0]
        scale = float(a[i + 1] * (lam[i + 1] - lam[i]))
        x_prev = x
        x = float(s[i + 1] / s[i]) * x
        for wj, mj in zip(pw, hist, strict=False):
            x = x + scale * wj * mj
        report(callback, i, ts[i], x, pred)
    return x


@declare_options(_order(3), final_order_option(1), _lower_order_final(), _noisy_end(),
                 gaussian_fit_option())
def unipc_bh1(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
              callback: Callback | None = None, *, cond: Any = None, order: int = 3,
              final_order: int = 1, lower_order_final: bool = False,
              noisy_end: bool = False, gaussian_fit: str = "eps_ratio") -> Tensor:
    """UniPC with B(h) = h (Zhao et al. 2023, eq. 8); recommended for few steps."""
    return unipc(denoiser, x, ts, generator, callback, cond=cond, order=order, variant="bh1",
                 final_order=final_order, lower_order_final=lower_order_final,
                 noisy_end=noisy_end, gaussian_fit=gaussian_fit)


@declare_options(_order(2), final_order_option(1), _lower_order_final(), _noisy_end(),
                 gaussian_fit_option())
def unipc_bh2(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
              callback: Callback | None = None, *, cond: Any = None, order: int = 2,
              final_order: int = 1, lower_order_final: bool = False,
              noisy_end: bool = False, gaussian_fit: str = "eps_ratio") -> Tensor:
    """UniPC with B(h) = e^h - 1 (Zhao et al. 2023, eq. 9)."""
    return unipc(denoiser, x, ts, generator, callback, cond=cond, order=order, variant="bh2",
                 final_order=final_order, lower_order_final=lower_order_final,
                 noisy_end=noisy_end, gaussian_fit=gaussian_fit)


__all__ = ["unipc", "unipc_bh1", "unipc_bh2"]
