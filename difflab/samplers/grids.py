"""Time grids for sampling: decreasing times t_0 > t_1 > ... > t_N = t_min.

Discrete spacings pick N of the T training steps (DDPM indices 1..T) and end at t = 0
(Nichol & Dhariwal 2021 "respacing"; the names follow Lin et al. 2024, Table 2):

- ``linspace``: round(linspace(1, T, N)), both ends included;
- ``leading``:  1, 1 + T//N, 1 + 2 T//N, ...   (starts at the first step, misses t = T);
- ``trailing``: round(T, T - T/N, ..., T/N)    (always includes t = T).

Any process (discrete ones through their log-SNR interpolation):

- ``uniform``: [t_max, t_min] split evenly in t (Song et al. 2021);
- ``logsnr``:  N - 1 steps evenly spaced in lambda from lambda(t_max) down to the smallest
  noise level sigma~_min, then t_min (Lu et al. 2022, "logSNR" steps);
- ``karras``:  sigma~_i = (sigma~_max^(1/rho) + i / (N - 1) (sigma~_min^(1/rho) -
  sigma~_max^(1/rho)))^rho in sigma~ = sigma / alpha = exp(-lambda / 2), then t_min
  (Karras et al. 2022, eq. 5, rho = 7).

sigma~_min defaults to the first training step for discrete processes and to t_min + 1e-3
(t_max - t_min) for continuous ones (Song et al. 2021's epsilon); the last step of every
sampler goes from there to t_min by returning x0_hat.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..io import LoadError, atomic_write, read_json
from ..process import Process
from .base import check_grid

Spacing = Literal["linspace", "leading", "trailing", "uniform", "logsnr", "karras"]
SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing", "uniform", "logsnr", "karras")


def discrete_timesteps(T: int, n: int, spacing: Spacing = "trailing") -> Tensor:
    """N distinct DDPM step indices in 1..T, decreasing."""
    if not 1 <= n <= T:
        raise ValueError(f"number of steps must be in [1, {T}], got {n}")
    if spacing == "linspace":
        steps = torch.linspace(1, T, n, dtype=torch.float64).round()
    elif spacing == "leading":
        steps = torch.arange(n, dtype=torch.float64) * (T // n) + 1
    elif spacing == "trailing":
        steps = torch.arange(T, 0, -T / n, dtype=torch.float64).round()[:n]
    else:
        raise ValueError(f"unknown discrete spacing {spacing!r}; choose from "
                         "('linspace', 'leading', 'trailing')")
    steps = steps.long().unique()
    if steps.numel() != n:  # only possible for linspace with n close to T
        raise ValueError(f"spacing {spacing!r} gives repeated steps for n={n}, T={T}")
    return steps.flip(0)


def default_sigma_min(process: Process) -> float:
    """sigma~ = sigma / alpha of the least noisy level a sampler should visit."""
    return float((-0.5 * process.log_snr(first_noisy_time(process))).exp())


def first_noisy_time(process: Process) -> float:
    """The time of the least noisy level a sampler should visit (``default_sigma_min``): the
    first level of a discrete process's table (t_min + 1), 1e-3 of the range above t_min on a
    continuous one."""
    return process.t_min + (1.0 if process.is_discrete else 1e-3 * (process.t_max - process.t_min))


def noisy_end_grid(process: Process, ts: Tensor) -> Tensor:
    """The falling grid a ``noisy_end`` sampler runs on: ``ts`` itself when its last time is
    noisy; when it ends at sigma = 0, as every default grid does, that last time becomes the
    process's first noise level (``first_noisy_time``: on a DDPM table alpha_bar_0, where
    diffusers' DDIM, PNDM and UniPC with ``final_sigmas_type="sigma_min"`` end), or is dropped
    where the grid's last noisy time is already at or below that level."""
    if float(process.sigma(ts[-1])) > 0:
        return ts
    t_first = first_noisy_time(process)
    if float(ts[-2]) > t_first:
        return torch.cat([ts[:-1], torch.full_like(ts[-1:], t_first)])
    if len(ts) < 3:
        raise ValueError(f"noisy_end: the grid {ts.tolist()} has no noisy level to end at")
    return ts[:-1]


def noise_level_grid(process: Process, n: int, spacing: str, rho: float = 7.0,
                     sigma_min: float | None = None) -> Tensor:
    """N + 1 times: N levels from t_max to sigma~_min spaced in log-SNR or Karras-style, then
    t_min."""
    lam_max = float(process.log_snr(process.t_max))
    if not math.isfinite(lam_max):
        raise ValueError(f"spacing {spacing!r} needs a finite noise level at t_max")
    s_max = math.exp(-0.5 * lam_max)
    s_min = sigma_min if sigma_min is not None else default_sigma_min(process)
    s_floor = math.exp(-0.5 * float(process.log_snr(process.t_min)))
    if not s_floor < s_min < s_max:
        raise ValueError(f"need {s_floor:.4g} < sigma_min < {s_max:.4g} (sigma~ at t_min and "
                         f"t_max), got {s_min}")
    if n == 1:
        return torch.tensor([process.t_max, process.t_min], dtype=torch.float64)
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    if spacing == "logsnr":
        lam = lam_max + u * (-2 * math.log(s_min) - lam_max)
    else:
        st = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        lam = -2 * st.log()
    ts = process.t_from_log_snr(lam)
    ts[0] = process.t_max
    return torch.cat([ts, torch.tensor([process.t_min], dtype=torch.float64)])


def time_grid(process: Process, n: int, spacing: Spacing | None = None, *, rho: float = 7.0,
              sigma_min: float | None = None) -> Tensor:
    """A float64 grid of N + 1 decreasing times ending at ``process.t_min``: N sampler steps.

    ``spacing`` defaults to ``trailing`` for discrete processes and ``uniform`` otherwise;
    ``rho`` and ``sigma_min`` (in sigma~ = sigma / alpha) apply to ``karras`` / ``logsnr``.
    """
    if n < 1:
        raise ValueError(f"steps (--steps) must be at least 1, got {n}")
    spacing = spacing or ("trailing" if process.is_discrete else "uniform")
    if spacing == "uniform":
        return torch.linspace(process.t_max, process.t_min, n + 1, dtype=torch.float64)
    if spacing in ("logsnr", "karras"):
        return noise_level_grid(process, n, spacing, rho, sigma_min)
    if not process.is_discrete:
        raise ValueError(f"spacing {spacing!r} needs a discrete schedule; use 'uniform', "
                         "'logsnr' or 'karras'")
    steps = discrete_timesteps(int(process.t_max), n, spacing).to(torch.float64)
    return torch.cat([steps, torch.tensor([process.t_min], dtype=torch.float64)])


def save_time_grid(ts: Tensor, path: str | Path, **meta: Any) -> Path:
    """Write a time grid (e.g. one fitted by ``optimize_grid``) as JSON to store with its model:
    ``{"times": [t_0, ..., t_N], **meta}`` (meta: the sampler, its options, how it was fitted).
    ``difflab sample --grid PATH`` and ``load_time_grid`` read it back."""
    path = Path(path)
    times = [float(t) for t in check_grid(ts)]
    text = json.dumps({"times": times, **meta}, indent=1) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_time_grid(path: str | Path) -> Tensor:
    """Read a grid written by ``save_time_grid`` (or a plain JSON list of times) as a float64
    tensor, checked to be strictly decreasing."""
    data = read_json(path)
    times = data.get("times") if isinstance(data, dict) else data
    try:
        return check_grid(torch.tensor(times, dtype=torch.float64))
    except (TypeError, ValueError, RuntimeError) as e:
        raise LoadError(f"{path} is not a time grid ({{'times': [t_0, ..., t_N]}} or a list "
                        f"of decreasing times): {e}") from None
