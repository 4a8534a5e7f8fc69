"""Time grids for sampling: decreasing times t_0 > t_1 > ... > t_N = t_min.

Discrete spacings pick N of the T training steps (DDPM indices 1..T) and end at t = 0
(Nichol & Dhariwal 2021 "respacing"; the names follow Lin et al. 2024, Table 2):

- ``linspace``: round(linspace(1, T, N)), both ends included;
- ``leading``:  1, 1 + T//N, 1 + 2 T//N, ...   (starts at the first step, misses t = T);
- ``trailing``: round(T, T - T/N, ..., T/N)    (always includes t = T).

For continuous processes ``uniform`` splits [t_min, t_max] evenly.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..process import Process

Spacing = Literal["linspace", "leading", "trailing", "uniform"]
SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing", "uniform")


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


def time_grid(process: Process, n: int, spacing: Spacing | None = None) -> Tensor:
    """A float64 grid of N + 1 decreasing times ending at ``process.t_min``: N sampler steps.

    ``spacing`` defaults to ``trailing`` for discrete processes and ``uniform`` otherwise.
    """
    if n < 1:
        raise ValueError(f"number of steps must be at least 1, got {n}")
    spacing = spacing or ("trailing" if process.is_discrete else "uniform")
    if spacing == "uniform":
        return torch.linspace(process.t_max, process.t_min, n + 1, dtype=torch.float64)
    if not process.is_discrete:
        raise ValueError(f"spacing {spacing!r} needs a discrete schedule; use 'uniform'")
    steps = discrete_timesteps(int(process.t_max), n, spacing).to(torch.float64)
    return torch.cat([steps, torch.tensor([process.t_min], dtype=torch.float64)])
