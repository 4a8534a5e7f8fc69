"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes").

The main pass is the deterministic EDM Heun sampler on the grid (``heun``, Karras et al. 2022,
Alg. 2 without churn), in y = x / alpha against sigma~ = sigma / alpha. One restart interval
[sigma~_min, sigma~_max] is chosen: sigma~_min is the interior grid point nearest to
``restart_min`` (in log sigma~), where the main pass arrives. There the sampler restarts K
times (Xu et al., Alg. 1 / eq. 4):

  restart forward:   y <- y + S_noise sqrt(sigma~_max^2 - sigma~_min^2) n,  n ~ N(0, I) fresh,
  restart backward:  N_restart Heun steps of the PF ODE from sigma~_max back to sigma~_min,
                     on a Karras rho = 7 grid between them (as the paper's EDM setting),

then the main pass continues to the end and ends with the shared last step (``final_step``).
The forward jump is exact for the process: x / alpha at sigma~_min plus independent noise of
variance sigma~_max^2 - sigma~_min^2 has the marginal at sigma~_max, so the re-integration
contracts the error accumulated before sigma~_min (the paper's Theorem 2) while adding only
the discretisation error of the restart steps. With K = 0 it is ``heun`` exactly.

NFE: the main pass's (``heun``: 2 per step, 1 for the last) plus 2 K N_restart.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from ..process import Process
from .base import Callback, Generators, StepInfo, check_grid, randn_like, report, zero_snr_start
from .heun import GridHook, heun_pass, heun_update
from .options import SamplerOption, declare_options

#: sigma~_max / sigma~_min of the default interval: the paper's CIFAR-10 VP interval
#: [0.06, 0.30] (Xu et al. 2023, Sec. 5.1).
DEFAULT_RATIO = 5.0


def restart_index(st: list[float], restart_min: float) -> int:
    """Index of the interior grid point (1..N-1) whose sigma~ is nearest to ``restart_min`` in
    log sigma~; a ValueError if the grid has none (a single step)."""
    inner = [k for k in range(1, len(st) - 1) if st[k] > 0]
    if not inner:
        raise ValueError("sampler 'restart': restarting needs an interior noisy grid point "
                         "(at least 2 steps), or restarts=0")
    return min(inner, key=lambda k: abs(math.log(st[k] / restart_min)))


def restart_levels(process: Process, st_max: float, st_min: float, t_min: Tensor, n: int,
                   rho: float = 7.0) -> tuple[list[float], Tensor, list[float]]:
    """sigma~, times and alphas of the N_restart-step Karras grid from ``st_max`` down to
    ``st_min`` (Karras et al. 2022, eq. 5), ending exactly at the main grid's point
    (time ``t_min``)."""
    u = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    lo, hi = st_min ** (1 / rho), st_max ** (1 / rho)
    st = (hi + u * (lo - hi)) ** rho
    ts = process.t_from_log_snr(-2 * st.log())
    ts[-1] = t_min
    levels = st.tolist()
    levels[0], levels[-1] = st_max, st_min
    return levels, ts, process.alpha(ts).tolist()


def check_interval(st: list[float], j: int, restart_max: float | None) -> float:
    """sigma~_max of the interval: ``restart_max``, or ``DEFAULT_RATIO`` sigma~_min capped at the
    grid's first level; a ValueError unless sigma~_min < sigma~_max <= sigma~ at ts[0]."""
    st_max = min(DEFAULT_RATIO * st[j], st[0]) if restart_max is None else restart_max
    if not st[j] < st_max <= st[0]:
        raise ValueError(f"sampler 'restart': restart_max={st_max:.4g} must lie above sigma~ "
                         f"at the restart point ({st[j]:.4g}) and at most at the grid's first "
                         f"level ({st[0]:.4g})")
    return st_max


@declare_options(
    SamplerOption("restarts", int, 2, "K: how many times to restart from the interval's low "
                  "end; 0 is the heun sampler", min=0),
    SamplerOption("restart_steps", int, 3, "N_restart: Heun steps back down the interval per "
                  "restart (2 evaluations each)", min=1),
    SamplerOption("restart_min", float, 0.06, "sigma~ (= sigma / alpha) of the interval's low "
                  "end; the restart happens at the interior grid point nearest to it",
                  min=0.0, min_exclusive=True),
    SamplerOption("restart_max", float, None, "sigma~ the restart jumps back up to; None: 5 "
                  "times sigma~ at the restart point (the paper's [0.06, 0.30])",
                  min=0.0, min_exclusive=True),
    SamplerOption("s_noise", float, 1.0, "scale of the restart noise", min=0.0))
@zero_snr_start
@torch.no_grad()
def restart(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
            callback: Callback | None = None, *, cond: Any = None, restarts: int = 2,
            restart_steps: int = 3, restart_min: float = 0.06, restart_max: float | None = None,
            s_noise: float = 1.0) -> Tensor:
    """Restart sampling (Xu et al. 2023, Alg. 1): EDM Heun steps on the grid; at the grid point
    nearest ``restart_min`` add noise up to ``restart_max`` and re-integrate it with
    ``restart_steps`` Heun steps, ``restarts`` times. Callback indices count every step, the
    restart steps included. NFE: heun's on the grid + 2 restarts restart_steps."""
    ts = check_grid(ts)
    done = [0]  # restart steps reported so far: they shift the later main-pass indices
    at_grid = None
    if restarts > 0:
        at_grid = _restart_hook(denoiser, ts, generator, callback, cond, restarts,
                                restart_steps, restart_min, restart_max, s_noise, done)

    def shifted(info: StepInfo) -> None:
        if callback is not None:
            callback(StepInfo(i=info.i + done[0], t=info.t, x=info.x, x0=info.x0))

    return heun_pass(denoiser, x, ts, generator, shifted, cond, at_grid=at_grid)


def _restart_hook(denoiser: DenoiserFn, ts: Tensor, generator: Generators,
                  callback: Callback | None, cond: Any, restarts: int, restart_steps: int,
                  restart_min: float, restart_max: float | None, s_noise: float,
                  done: list[int]) -> GridHook:
    """The restarts as ``heun_pass``'s grid hook: at the restart point j, K times the forward
    jump to sigma~_max and N_restart Heun steps back (Xu et al. 2023, Alg. 1); ``done`` counts
    the restart steps reported."""
    process = denoiser.process
    a, s = process.alpha_sigma(ts)
    st = (s / a).tolist()
    j = restart_index(st, restart_min)
    st_max = check_interval(st, j, restart_max)
    levels, times, alphas = restart_levels(process, st_max, st[j], ts[j], restart_steps)
    jump = s_noise * math.sqrt(st_max**2 - st[j] ** 2)

    def at_grid(k: int, y: Tensor) -> Tensor:
        if k != j:
            return y
        for _ in range(restarts):
            y = y + jump * randn_like(y, generator)                    # restart forward
            for m in range(restart_steps):                              # restart backward
                pred = denoiser(alphas[m] * y, times[m], cond)
                y = heun_update(denoiser, y, pred, levels[m + 1] - levels[m], alphas[m + 1],
                                times[m + 1], cond)
                report(callback, j + done[0], times[m], alphas[m + 1] * y, pred)
                done[0] += 1
        return y

    return at_grid


__all__ = ["restart", "restart_index", "restart_levels"]
