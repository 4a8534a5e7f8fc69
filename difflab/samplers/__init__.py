"""Samplers: stateless functions over a denoiser and a decreasing time grid.

Every entry of ``SAMPLERS`` has the signature ``(denoiser, x, ts, generator=None,
callback=None, *, cond=None, **options)`` and returns x0_hat after its last step (or, with
``final_order`` > 1, a higher-order step to clean data; ``base``). Each declares its options
(``options.declare_options``); ``check_sampler_options`` and ``parse_sampler_options`` validate
a user's options against the declaration, naming the sampler and the options it takes.

Adding a sampler: write it in its module with ``@declare_options(...)``, and add it to
``SAMPLERS`` here (and to ``ODE_SAMPLERS`` if it also inverts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .adaptive_sde import adaptive_sde
from .ancestral import ddim, ddpm
from .ays import fit_grid_family, grid_family, optimize_schedule, optimize_schedules
from .base import CountingDenoiser, StepInfo, check_grid, check_ode_grid
from .consistency import ODE_SOLVERS, consistency, ode_step
from .ddgan import ddgan
from .dpm_solver import dpm_solver, dpmpp_2m, dpmpp_3m, dpmpp_sde
from .dpm_solver_v3 import dpm_solver_v3
from .ems import EMSStatistics, ems_lambdas, ems_statistics
from .gddim import gddim
from .grids import (
    SPACINGS,
    default_sigma_min,
    discrete_timesteps,
    load_time_grid,
    save_time_grid,
    time_grid,
)
from .heun import euler, heun
from .langevin import annealed_langevin, pc
from .local_gaussian import local_gaussian, local_unipc
from .multistep import lms, plms
from .optimize import (
    fit_grid,
    fit_three_piece_grid,
    optimize_grid,
    reference_solution,
    stratified_draws,
    three_piece_grid,
)
from .options import (
    SamplerOption,
    check_options,
    declared_options,
    describe_options,
    parse_options,
)
from .renoise import renoise
from .restart import restart
from .rk import rk45
from .sde import euler_maruyama, euler_ode
from .teleport import (
    GaussianDenoiser,
    GaussianHead,
    GaussianMoments,
    data_moments,
    skip_level,
    teleport,
)
from .unipc import unipc, unipc_bh1, unipc_bh2

SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm, "ddim": ddim, "euler_maruyama": euler_maruyama, "euler": euler,
    "euler_ode": euler_ode, "heun": heun, "rk45": rk45, "plms": plms, "lms": lms,
    "dpm_solver": dpm_solver, "dpmpp_2m": dpmpp_2m, "dpmpp_3m": dpmpp_3m,
    "dpmpp_sde": dpmpp_sde, "unipc_bh1": unipc_bh1, "unipc_bh2": unipc_bh2, "pc": pc,
    "annealed_langevin": annealed_langevin, "renoise": renoise, "ddgan": ddgan,
    "consistency": consistency,
}
SAMPLERS["restart"] = restart
SAMPLERS["adaptive_sde"] = adaptive_sde
SAMPLERS["dpm_solver_v3"] = dpm_solver_v3
SAMPLERS["gddim"] = gddim
SAMPLERS["local_gaussian"] = local_gaussian
SAMPLERS["local_unipc"] = local_unipc

# The deterministic (probability-flow ODE) samplers: they also run upwards on a rising grid,
# which is inversion (``base.check_ode_grid``, ``difflab.editing.ode_invert``).
ODE_SAMPLERS: tuple[str, ...] = ("ddim", "euler", "euler_ode", "heun", "rk45", "plms", "lms",
                                 "dpm_solver", "dpmpp_2m", "dpmpp_3m", "unipc_bh1", "unipc_bh2",
                                 "local_gaussian", "local_unipc")


def get_sampler(name: str) -> Callable:
    """Look a sampler up by name, with an error listing the valid names."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_options(name: str) -> dict[str, SamplerOption]:
    """The options sampler ``name`` takes (all but ``cond``), in declaration order."""
    return dict(declared_options(get_sampler(name)))


#: the local order of each fixed-grid ODE sampler's steps, where no ``order`` option sets it
_FIXED_ORDERS = {"ddim": 1, "euler": 1, "euler_ode": 1, "heun": 2, "plms": 4, "dpmpp_2m": 2,
                 "dpmpp_3m": 3}
#: ``schedule_order``'s cap (the measurements behind it and the rule: docs/samplers.md,
#: "Schedules that generalise")
MAX_SCHEDULE_ORDER = 3


def schedule_order(name: str, options: Mapping[str, Any] | None = None,
                   cap: int = MAX_SCHEDULE_ORDER) -> int:
    """The ``order`` to give ``optimize_schedule`` for a grid of the fixed-grid ODE sampler
    ``name`` with ``options``: the order of its (predictor) steps, at most ``cap``: 1 for DDIM
    and the Euler methods, 2 for Heun and DPM-Solver++ 2M, 3 for DPM-Solver++ 3M, 4 for plms,
    the ``order`` option of lms, dpm_solver and UniPC (whose corrector is not counted: on the
    benchmark family UniPC bh2's grids of order 3 are worse than those of order 2)."""
    opts = check_sampler_options(name, options or {})
    if name in _FIXED_ORDERS:
        order = _FIXED_ORDERS[name]
    elif name in ("lms", "dpm_solver", "unipc_bh1", "unipc_bh2", "local_gaussian",
                  "local_unipc"):
        declared = sampler_options(name)["order"].default
        order = opts.get("order", declared)
    else:
        raise ValueError(f"{name!r} has no fixed-grid order; schedule_order takes "
                         f"{', '.join(s for s in ODE_SAMPLERS if s != 'rk45')}")
    return max(1, min(order, cap))


def check_sampler_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` validated for sampler ``name`` and converted to the declared types; a
    ValueError naming the sampler and the options it takes for one it does not take, e.g.
    "sampler 'heun' does not take option 'eta'; heun's options: churn, s_tmin, ...", or the
    option and what it must be for a bad value."""
    return check_options(name, sampler_options(name), options)


def parse_sampler_options(name: str, items: Sequence[str]) -> dict[str, Any]:
    """``["order=3", "eta=0.5"]`` (e.g. repeated ``--sampler-opt``) parsed by the types sampler
    ``name`` declares (true/false, ints, floats incl. inf, strings, None where the default is
    None) and validated as ``check_sampler_options`` does; a malformed item is a ValueError
    naming it."""
    return parse_options(name, sampler_options(name), items)


def describe_sampler(name: str) -> str:
    """One line per option of sampler ``name``, "name (requirement; default d): help", or
    "<name> takes no options": for --help text and error messages."""
    return describe_options(name, sampler_options(name))


__all__ = ["SAMPLERS", "SPACINGS", "CountingDenoiser", "StepInfo", "annealed_langevin",
           "check_grid", "ddim", "ddpm", "default_sigma_min", "discrete_timesteps",
           "dpm_solver", "dpmpp_2m", "dpmpp_3m", "dpmpp_sde", "euler", "euler_maruyama",
           "euler_ode",
           "get_sampler", "heun", "lms", "load_time_grid", "optimize_grid", "pc", "plms",
           "reference_solution", "rk45", "save_time_grid", "schedule_order",
           "stratified_draws", "time_grid",
           "unipc", "unipc_bh1", "unipc_bh2"]
__all__ += ["ODE_SAMPLERS", "check_ode_grid", "fit_grid", "fit_three_piece_grid",
            "three_piece_grid", "ddgan", "renoise"]
__all__ += ["ODE_SOLVERS", "consistency", "ode_step"]
__all__ += ["restart"]
__all__ += ["adaptive_sde", "gddim", "local_gaussian", "local_unipc"]
__all__ += ["EMSStatistics", "dpm_solver_v3", "ems_lambdas", "ems_statistics"]
__all__ += ["fit_grid_family", "grid_family", "optimize_schedule", "optimize_schedules"]
__all__ += ["GaussianDenoiser", "GaussianHead", "GaussianMoments", "data_moments", "skip_level",
            "teleport"]
__all__ += ["SamplerOption", "check_sampler_options", "describe_sampler",
            "parse_sampler_options", "sampler_options"]
