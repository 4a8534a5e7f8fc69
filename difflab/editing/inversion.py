"""Deterministic inversion x0 -> x_T and reconstruction x_T -> x0 through the probability-flow
ODE, with any deterministic sampler run backwards (upwards in noise) on the sampling grid.

In the EDM variables y = x / alpha and s = sigma / alpha (Karras et al. 2022, eq. 4) the
probability-flow ODE of every VP process is dy/ds = eps_hat(alpha y, t(s)); sampling integrates
it from s_max down to 0, inversion from 0 up to s_max. Every sampler in ``ODE_SAMPLERS`` (DDIM,
Euler in lambda, Heun, RK45, PLMS/LMS, DPM-Solver, DPM-Solver++ 2M/3M, UniPC) takes a rising
grid and runs the same update upwards: their formulas (Adams-Bashforth in sigma~, exponential
integrators in lambda) hold for steps of either sign (``samplers.base.check_ode_grid``).
DDIM inversion is Euler's method in (y, s) (Song et al. 2021, eq. 14).

The first inversion step leaves clean data (s = 0), where the network is never evaluated: it
is the explicit mirror of the samplers' final denoising step, with eps_hat taken at the
destination time t_1 (as in Mokady et al. 2023): y_1 = x0 + s_1 eps_hat(x0, t_1). The sampler
then runs on the rest of the grid reversed, t_1 < ... < t_N = t_max, so the network sees the
same times as in sampling. Reconstruction with the same sampler on the same grid returns the
input to within the solver's error, which shrinks at the solver's order as the grid is refined.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from ..samplers import ODE_SAMPLERS, get_sampler, sampler_options
from ..samplers.base import Callback, check_grid, report

METHODS: tuple[str, ...] = ODE_SAMPLERS


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose from {METHODS}")


def _shifted(callback: Callback | None, by: int) -> Callback | None:
    """The callback with step indices moved on by ``by`` (the sampler starts at step 1)."""
    if callback is None:
        return None
    return lambda info: callback(dataclasses.replace(info, i=info.i + by))


@torch.no_grad()
def ode_invert(denoiser: DenoiserFn, x0: Tensor, ts: Tensor, method: str = "ddim",
               callback: Callback | None = None, *, cond: Any = None, **options: Any
               ) -> Tensor:
    """Map data x0 (at ts[-1]) to noise at ts[0], walking the sampling grid ``ts`` upwards:
    one explicit step off clean data, then the sampler ``method`` (any of ``METHODS``) on the
    rest of the grid reversed; ``options`` go to the sampler (e.g. ``order``, ``rtol``).
    Invert with ``reconstruct`` (the same sampler, same grid, same options)."""
    _check_method(method)
    t = check_grid(ts).flip(0)
    a_t, s_t = denoiser.process.alpha_sigma(t[:2])
    a, st = a_t.tolist(), (s_t / a_t).tolist()
    pred = denoiser(x0, t[1], cond)  # first step: eps at the destination time
    x = a[1] * (x0 / a[0] + (st[1] - st[0]) * pred.eps)
    report(callback, 0, t[1], x, pred)
    if len(t) == 2:
        return x
    return get_sampler(method)(denoiser, x, t[1:], callback=_shifted(callback, 1), cond=cond,
                               **options)


def ddim_invert(denoiser: DenoiserFn, x0: Tensor, ts: Tensor, callback: Callback | None = None,
                *, cond: Any = None) -> Tensor:
    """DDIM inversion: ``ode_invert`` with Euler steps (the inverse of ``ddim``, eta = 0)."""
    return ode_invert(denoiser, x0, ts, "ddim", callback, cond=cond)


def reconstruct(denoiser: DenoiserFn, x_T: Tensor, ts: Tensor, method: str = "ddim", *,
                cond: Any = None, **options: Any) -> Tensor:
    """Run the sampler named ``method`` (eta = 0 / no churn) from x_T down the grid. Its last
    step returns x0_hat, the mirror of ``ode_invert``'s first step: ``plms``/``lms`` default
    to ``final_order=1`` here, as their multistep step to clean data (their sampling
    default) does not mirror it and would leave a round-trip error that does not shrink with
    the number of steps (the last interval, sigma~_min -> 0, stays the same)."""
    _check_method(method)
    sampler = get_sampler(method)
    if "final_order" in sampler_options(method):
        options.setdefault("final_order", 1)
    return sampler(denoiser, x_T, ts, cond=cond, **options)


__all__ = ["METHODS", "ddim_invert", "ode_invert", "reconstruct"]
