"""Samplers: stateless functions over a denoiser and a decreasing time grid."""

from __future__ import annotations

from collections.abc import Callable

from .ancestral import ddim, ddpm
from .base import StepInfo, check_grid
from .grids import SPACINGS, discrete_timesteps, time_grid

SAMPLERS: dict[str, Callable] = {"ddpm": ddpm, "ddim": ddim}


def get_sampler(name: str) -> Callable:
    """Look a sampler up by name, with an error listing the valid names."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[name]


__all__ = ["SAMPLERS", "SPACINGS", "StepInfo", "check_grid", "ddim", "ddpm",
           "discrete_timesteps", "get_sampler", "time_grid"]
