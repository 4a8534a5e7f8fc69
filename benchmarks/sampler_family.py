"""Samplers on a family of exact problems, with grids fitted on one part and scored on another.

    OMP_NUM_THREADS=1 python benchmarks/sampler_family.py             # prints markdown tables
    OMP_NUM_THREADS=1 python benchmarks/sampler_family.py --readme    # also into README.md
    python benchmarks/sampler_family.py --problems 6 --draws 64       # a quick run

Each problem is a Gaussian mixture with an exact denoiser (``difflab.analytic``): dimension
d log-uniform in 2..256, K uniform in 1..16 components with Dirichlet(1) weights, component
scales log-uniform in 0.01..1 with isotropic, diagonal or full covariances (full: a diagonal
mixture seen through one random rotation Q, so covariance Q diag(s_k^2) Q^T), under one of
the schedules linear, cosine, scaled_linear (DDPM, T = 1000), vpsde and EDM's VE sigma range
(0.002..80). Problems with even index (seed B + i, B = ``--seed-base``, default 1000) are FIT
problems, odd ones HELD-OUT; nothing fitted ever sees a held-out problem's reference or noise.
``--seed-base 16000`` draws a fresh family (the samplers, grids and optimiser were tuned on
seeds 1000..1023; the ranges 2000 to 8000 were each fresh once and have been looked at since;
9000 served a smoke run; 10000 and 11000 ran once, fresh, with the Gaussian head and
DPM-Solver-v3 candidates, and the "ays3" grid was added after 11000; 12000 to 15000 ran once,
fresh, with it; 16000 served a smoke run; 17000 and 18000 ran once, fresh, with the two-point
last step added, and the singlestep candidate in diffusers' form was added after the 17000
failures; 19000 and 20000 ran once, fresh, with it, and 21000 to 24000 once after them;
25000 and 26000 ran once, fresh, with the ``local_gaussian`` candidates, and 19000 to 24000
were rerun with them; 27000 and 28000 ran once, fresh, with ``local_unipc`` added, and 19000
to 26000 got its configurations by ``evaluate(only=...)``; 29000 and 30000 ran once, fresh,
with ``local_unipc, order=3`` added, and every other saved range got it the same way; 31000
ran once, fresh, with the same candidates).
``--load RUN.json`` reprints a run saved with ``--save``; ``--compare OTHER.json`` adds the
goal status of another saved run.

Error: RMS distance to the model's own PF-ODE solution from the same x_T (DOP853,
``reference_solution``). Every sampler, difflab's and diffusers', is driven by the same exact
model from the same noise. diffusers runs on a 1000-level table of the problem's process
(``trained_betas``; index k <-> difflab time t_k), so its float32 tables differ from difflab's
float64 ones by ~1e-4 relative in sigma. difflab grids:

- default: the trailing pick of the same 1000-level table that diffusers' trailing spacing
  uses (for DDPM schedules exactly ``time_grid(process, n, "trailing")``);
- ays: ``optimize_schedule`` on the held-out problem's denoiser and fresh data draws (no
  reference, no evaluation noise);
- ays3: the same with the bound of order 3, for the samplers of order 3 and more;
- family: ``grid_family`` with (rho, warp) fitted per sampler and NFE on the FIT problems
  (``fit_grid_family``), applied unchanged to the held-out ones;
- head: the ays grid from sigma~_skip = ``skip_level`` of the same fresh draws' moments down,
  behind t_max, with the model behind a ``GaussianHead`` (levels above sigma~_skip answered by
  the data Gaussian at no evaluation), where sigma~_skip < sigma~_max / 2.

``dpm_solver_v3, ems`` runs DPM-Solver-v3 on empirical model statistics estimated per held-out
problem from EMS_DRAWS other fresh data draws (``problem_statistics``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# this checkout's difflab, not whichever one is installed (a script's sys.path[0] is
# benchmarks/, so the repository root is not on the path by itself)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from difflab.analytic import GaussianMixture
from difflab.parameterization import Prediction
from difflab.process import make_process
from difflab.samplers import CountingDenoiser, discrete_timesteps, reference_solution
from difflab.samplers.ays import fit_grid_family, grid_family, optimize_schedules
from difflab.samplers.teleport import GaussianHead, data_moments, skip_level

sys.path.insert(0, str(Path(__file__).parent))
from readme_section import write_section  # noqa: E402
from sampler_family_tables import (  # noqa: E402
    FAILED,
    HEADING,
    INDEX_ROW,
    LEVELS,
    NFES,
    README_INTRO,
    compare_line,
    load_results,
    report,
)
from samplers import DIFFLAB, diffusers_schedulers, run_diffusers  # noqa: E402

from difflab.samplers import (  # noqa: E402
    ddim,
    dpm_solver,
    dpm_solver_v3,
    dpmpp_2m,
    ems_lambdas,
    ems_statistics,
    heun,
    local_gaussian,
    local_unipc,
    plms,
    unipc_bh1,
    unipc_bh2,
)

#: the ``statistics`` option of a DPM-Solver-v3 candidate that ``difflab_errors`` replaces by
#: the held-out problem's own empirical model statistics (``problem_statistics``)
EMS = "ems of the problem"

#: candidates of this benchmark beyond ``samplers.DIFFLAB`` (same fields), and the evaluations
#: each spends beyond one per step (``EXTRA_NFE``): plms with PNDM's trapezoidal first step
#: runs NFE - 1 steps, as diffusers' PNDM does
CANDIDATES = [*DIFFLAB,
              ("plms, warm_start=heun", plms, {"warm_start": "heun"}, "trailing", 1),
              ("plms, warm_start=heun, final_order=0", plms,
               {"warm_start": "heun", "final_order": 0}, "trailing", 1),
              # diffusers' bh1 end: ts[-1] -> the table's first level, returned noisy there
              # (default grid only: ``difflab_errors`` moves its last time)
              ("unipc_bh1, noisy_end", unipc_bh1, {"noisy_end": True}, "trailing", 1),
              # diffusers' PNDM end (set_alpha_to_one=False): the last step lands on the
              # table's first level and x is returned there (default grid only, as above)
              ("plms, noisy_end", plms, {"noisy_end": True}, "trailing", 1),
              ("plms, warm_start=heun, noisy_end", plms,
               {"warm_start": "heun", "noisy_end": True}, "trailing", 1),
              ("heun, final_order=0", heun, {"final_order": 0}, "trailing", 2),
              # the local Gaussian fitted to the last two evaluations wherever they were made
              # (``base.two_point_gaussian_step``), not along one assumed trajectory
              *[(f"{name}, final_order=0, two_point", fn,
                 {"final_order": 0, "gaussian_fit": "two_point"}, "trailing", k)
                for name, fn, k in (("heun", heun, 2), ("plms", plms, 1),
                                    ("dpmpp_2m", dpmpp_2m, 1), ("unipc_bh1", unipc_bh1, 1),
                                    ("unipc_bh2", unipc_bh2, 1))],
              # diffusers' DDIM end when n does not divide T (it lands on alpha_bar_0)
              ("ddim, noisy_end", ddim, {"noisy_end": True}, "trailing", 1),
              # singlestep DPM-Solver++(3) as diffusers' DPMSolverSinglestepScheduler runs it
              # (the paper's midpoint forms, lower-order remainder at the clean end, no guard
              # on steep steps): the same solver as diffusers' on the same grid
              ("dpm_solver (3), data_prediction, midpoint", dpm_solver,
               {"order": 3, "data_prediction": True, "form": "midpoint", "remainder": "last",
                "steep_guard": False}, "trailing", 1),
              # DPM-Solver-v3 (Zheng et al. 2023) on statistics estimated from the problem's
              # model and fresh data draws, as AYS is (no reference, no evaluation noise)
              ("dpm_solver_v3, ems", dpm_solver_v3, {"statistics": EMS}, "trailing", 1),
              ("dpm_solver_v3, ems, predictor_pseudo", dpm_solver_v3,
               {"statistics": EMS, "predictor_pseudo": True}, "trailing", 1),
              # DPM-Solver++(2M) in the variance-shifted time q = sqrt(u + sigma~^2), u fitted
              # per example to the last two evaluations (exact for isotropic Gaussian data)
              ("local_gaussian", local_gaussian, {}, "trailing", 1),
              ("local_gaussian, corrected_end=false", local_gaussian, {"corrected_end": False},
               "trailing", 1),
              # the same with UniPC's corrector in that time (unipc_bh2 where u = 0), and with
              # UniPC's third-order predictor
              ("local_unipc", local_unipc, {}, "trailing", 1),
              ("local_unipc, order=3", local_unipc, {"order": 3}, "trailing", 1)]
EXTRA_NFE = {"plms, warm_start=heun": 1, "plms, warm_start=heun, final_order=0": 1,
             "plms, warm_start=heun, noisy_end": 1}

SCHEDULES = ("linear", "cosine", "scaled_linear", "vpsde", "ve")
COVARIANCES = ("isotropic", "diagonal", "full")
AYS_FLOOR = 2e-4  # the smallest sigma~ the optimiser may end at (it chooses where, free_end)
#: EMS statistics per held-out problem: data draws and lambda knots (from lambda(t_max) down
#: to sigma~ = AYS_FLOOR, so that they cover every grid of the run)
EMS_DRAWS, EMS_KNOTS = 512, 64
#: the bound's order per sampler (``optimize_schedule(order=)``): 1 for the first-order
#: samplers, 2 for every other (higher orders assume more smoothness than these data have)
AYS_ORDER = {"ddim": 1, "euler_ode": 1}
#: samplers of order 3 or more (their steps' local error O(h^4) or smaller: the multistep
#: methods of order >= 3, singlestep DPM-Solver-3, UniPC's corrected steps, DPM-Solver-v3) also
#: run on "ays3", the grid of the bound of order 3 (``optimize_schedule(order=3)``)
LOW_ORDER = ("ddim", "euler_ode", "heun", "dpmpp_2m", "local_gaussian")
#: difflab samplers that get a family fitted (the fit is the costly part of the run)
FAMILY = ("ddim", "heun", "plms", "dpmpp_2m", "unipc_bh1, final_order=3")


class RotatedMixture:
    """A mixture seen through an orthogonal Q: x0 = Q y0. Since Q eps is again N(0, I), the
    noisy x_t = Q y_t and D(x, t) = Q D_y(Q^T x, t), eps_hat likewise (exact, full covariance)."""

    def __init__(self, inner: GaussianMixture, q: torch.Tensor):
        self.inner, self.q, self.process = inner, q, inner.process

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inner.sample(n, generator) @ self.q.T

    def __call__(self, x, t, cond=None) -> Prediction:
        p = self.inner(x @ self.q, t)
        return Prediction(x0=p.x0 @ self.q.T, eps=p.eps @ self.q.T)


@dataclass
class Problem:
    name: str
    data: object            # the exact denoiser (with .process and .sample)
    times: torch.Tensor     # the 1000-level table: difflab time of diffusers index k
    sigmas: torch.Tensor    # sigma~ of each level

    @property
    def process(self):
        return self.data.process

    def default_grid(self, n: int) -> torch.Tensor:
        idx = discrete_timesteps(LEVELS, n, "trailing") - 1
        return torch.cat([self.times[idx], torch.tensor([self.process.t_min],
                                                        dtype=torch.float64)])


def level_table(name: str, process) -> tuple[torch.Tensor, torch.Tensor]:
    """Times t_k (k = 0..999) of diffusers' table and their sigma~."""
    k = torch.arange(1, LEVELS + 1, dtype=torch.float64)
    if name == "ve":
        times = torch.logspace(math.log10(0.002), math.log10(80.0), LEVELS, dtype=torch.float64)
    elif name == "vpsde":
        times = k / LEVELS
    else:
        times = k
    return times, (-0.5 * process.log_snr(times)).exp()


def draw_problem(seed: int) -> Problem:
    """One random exact problem (module docstring); deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    d = int(round(math.exp(rng.uniform(math.log(2), math.log(256)))))
    k = int(rng.integers(1, 17))
    cov = COVARIANCES[rng.integers(3)]
    sched = SCHEDULES[rng.integers(len(SCHEDULES))]
    process = make_process(sched, **({"sigma_max": 80.0} if sched == "ve" else {}))
    scale = math.exp(rng.uniform(math.log(0.01), math.log(1.0)))
    mu = rng.standard_normal((k, d)) * rng.uniform(0.5, 2.0) / math.sqrt(d)
    if cov == "isotropic":
        std = scale * np.exp(rng.uniform(-0.5, 0.5, (k, 1))) * np.ones((k, d))
    else:
        std = scale * np.exp(rng.uniform(-1.0, 1.0, (k, d)))
    std = np.clip(std, 0.01, 1.0)
    w = rng.dirichlet(np.ones(k))
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    data = GaussianMixture(process, t(mu), t(std), t(w))
    if cov == "full":
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        data = RotatedMixture(data, t(q))
    times, sigmas = level_table(sched, process)
    name = f"{sched} d={d} K={k} {cov} s={scale:.3g}"
    return Problem(name, data, times, sigmas)


class TableModel:
    """The exact model as diffusers sees it: ``run_diffusers`` calls it with its variance-
    preserving input at (fractional) index k + 1; the level's sigma~ is interpolated in log
    sigma~ as diffusers does, and the input rescaled to the problem's process."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.log_s = problem.sigmas.log()

    def __call__(self, x, k1: float):
        k = min(max(k1 - 1.0, 0.0), LEVELS - 1.0)
        lo = int(math.floor(k))
        hi = min(lo + 1, LEVELS - 1)
        log_s = self.log_s[lo] + (k - lo) * (self.log_s[hi] - self.log_s[lo])
        proc = self.problem.process
        t = self.problem.times[lo] if k == lo else proc.t_from_log_snr(-2 * log_s)
        s = float(log_s.exp())
        a_vp = 1 / math.sqrt(1 + s * s)
        return self.problem.data(x.to(torch.float64) * (float(proc.alpha(t)) / a_vp), t)


def vp_state(problem: Problem, x_T: torch.Tensor) -> torch.Tensor:
    """difflab's initial state at t_max as diffusers' variance-preserving sample at its last
    level (``run_diffusers`` scales it to each scheduler's sample, ``samplers.ve_scale``): the
    same start for both."""
    s_max = float(problem.sigmas[-1])
    return x_T * (1 / math.sqrt(1 + s_max**2)) / float(problem.process.alpha(
        problem.process.t_max))


def family_schedulers() -> dict[str, tuple[type, dict]]:
    """diffusers' schedulers of ``samplers.diffusers_schedulers`` and DPMSolverSinglestep 3 on
    the trailing spacing (difflab's default grid: the namesake of ``dpm_solver``'s midpoint
    form; its default spacing, linspace, ends one level lower)."""
    import diffusers as d

    class TrailingSinglestep(d.DPMSolverSinglestepScheduler):
        """DPMSolverSinglestepScheduler on the trailing timesteps (it has no
        ``timestep_spacing``; custom ``timesteps`` are its way to another spacing)."""

        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            if num_inference_steps is not None and kw.get("timesteps") is None:
                n_train = self.config.num_train_timesteps
                kw["timesteps"] = (discrete_timesteps(n_train, num_inference_steps, "trailing")
                                   - 1).tolist()
                num_inference_steps = None
            return super().set_timesteps(num_inference_steps, device, **kw)

    return {**diffusers_schedulers(),
            "DPMSolverSinglestep 3 trailing": (TrailingSinglestep, {"solver_order": 3})}


def diffusers_errors(problem, z, ref, only=None, outputs=None) -> dict[str, dict[int, float]]:
    """({label: {nfe: rms}}, the same with ``rms_halves``) for every ``family_schedulers``
    scheduler, or only those in ``only``; ``outputs`` (a dict) also receives each final x as
    outputs[label][nfe] (``sampler_family_tails.py``)."""
    abar = 1 / (1 + problem.sigmas**2)
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    model = TableModel(problem)
    out, halves = {}, {}
    for label, (cls, cfg) in family_schedulers().items():
        if only is not None and label not in only:
            continue
        cfg = {**cfg, "trained_betas": betas.tolist()}
        out[label], halves[label] = {}, {}
        for m in NFES:
            try:
                x, _ = run_diffusers(cls, cfg, model, z, m)
            except (IndexError, ValueError, RuntimeError):  # e.g. Karras sigmas that repeat
                FAILED.append(f"{label} at {m} NFE on {problem.name}")
                out[label][m], halves[label][m] = math.inf, [math.inf, math.inf]
                continue
            if outputs is not None:
                outputs.setdefault(label, {})[m] = x.to(torch.float64)
            out[label][m] = rms(x.to(torch.float64), ref)
            halves[label][m] = rms_halves(x.to(torch.float64), ref)
    return out, halves


def rms(a, b) -> float:
    e = float((a - b).pow(2).mean().sqrt())
    return e if math.isfinite(e) else math.inf


def rms_halves(a, b) -> list[float]:
    """The RMS error over the first and over the second half of the draws (``crossfit``
    selects a configuration on one half and scores it on the other)."""
    h = len(a) // 2
    return [rms(a[:h], b[:h]), rms(a[h:], b[h:])]


def steps_for(nfe: int, k: int, label: str = "") -> int:
    """Steps of a sampler with ``k`` evaluations per step (and ``EXTRA_NFE[label]`` more in
    all) within ``nfe`` evaluations."""
    return (nfe - 1 - EXTRA_NFE.get(label, 0)) // k + 1


def problem_statistics(problem: Problem, seed: int):
    """DPM-Solver-v3's empirical model statistics of the problem's model, estimated from
    EMS_DRAWS fresh data draws (``ems_statistics``; the generator seeds draws and probes)."""
    gen = torch.Generator().manual_seed(seed)
    data = problem.data.sample(EMS_DRAWS, gen)
    knots = ems_lambdas(problem.process, EMS_KNOTS, sigma_min=AYS_FLOOR)
    return ems_statistics(problem.data, data, knots, generator=gen)


def difflab_errors(problem, x_T, ref, grids, statistics=None, head=None, only=None,
                   outputs=None) -> tuple[dict[str, dict[int, float]], dict]:
    """({"label [grid]": {nfe: rms}}, the same with ``rms_halves``) for every CANDIDATES
    sampler on every grid in ``grids``
    ({grid name: fn(label, k, nfe) -> ts or None}). A ``noisy_end`` sampler runs on the
    default grid only, its last time (t_min) moved to the table's first level; the option
    ``statistics=EMS`` becomes ``statistics`` (``problem_statistics``). On the grid "head"
    the model is ``head(model)`` (a ``GaussianHead``: its levels above sigma~_skip cost no
    evaluation); the EMS candidates do not run there. ``only`` and ``outputs`` as in
    ``diffusers_errors`` (keys "label [grid]")."""
    out, halves = {}, {}
    for label, fn, opts, _spacing, k in CANDIDATES:
        if opts.get("statistics") == EMS:
            opts = {**opts, "statistics": statistics}
        for gname, make in grids.items():
            if opts.get("noisy_end") and gname != "default":
                continue
            if gname == "head" and "statistics" in opts:
                continue
            if only is not None and f"{label} [{gname}]" not in only:
                continue
            row, half = {}, {}
            for m in NFES:
                ts = make(label, k, m)
                if ts is None:
                    continue
                if opts.get("noisy_end"):
                    ts = torch.cat([ts[:-1], problem.times[:1]])
                counted = CountingDenoiser(problem.data)
                model = head(counted) if gname == "head" else counted
                x = fn(model, x_T, ts, torch.Generator().manual_seed(0), **opts)
                ok = counted.nfe <= m
                if outputs is not None and ok:
                    outputs.setdefault(f"{label} [{gname}]", {})[m] = x
                row[m] = rms(x, ref) if ok else math.inf
                half[m] = rms_halves(x, ref) if ok else [math.inf, math.inf]
            if row:
                out[f"{label} [{gname}]"], halves[f"{label} [{gname}]"] = row, half
    return out, halves


def sigma_min(problem: Problem) -> float:
    return float(problem.sigmas[0])


def noise(problem: Problem, n: int, seed: int) -> torch.Tensor:
    d = problem.data.sample(1).shape[1]
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z


def fit_families(fit: list[Problem], draws: int, tol: float) -> dict[tuple[str, int], tuple]:
    """(rho, warp, smallest level) per FAMILY sampler and NFE, fitted on the FIT problems."""
    cases, lows = [], {}
    for i, p in enumerate(fit):
        x_T = noise(p, draws, 50 + i) * float(p.process.sigma(p.process.t_max))
        cases.append((p.data, x_T, reference_solution(p.data, x_T, tol)))
        lows[id(p.process)] = sigma_min(p)
    out = {}
    for label, fn, opts, _s, k in DIFFLAB:
        if label not in FAMILY:
            continue
        for m in NFES:
            out[label, m] = fit_grid_family(cases, fn, steps_for(m, k),
                                            rhos=(2.0, 4.0, 7.0, 15.0, math.inf),
                                            warps=(0.35, 0.5, 0.65, 0.8, 1.0),
                                            sigma_mins=(None, 2e-3, 2e-4),
                                            sigma_min=lambda pr: lows[id(pr)], **opts)
    return out


def evaluate(problem: Problem, seed: int, draws: int, tol: float, families, only=None,
             outputs=None, noise_seed: int | None = None) -> dict:
    """All errors on one held-out problem: {"difflab": {...}, "diffusers": {...}}. ``seed``
    seeds the evaluation noise and every fresh draw the grids and statistics are fitted on;
    ``noise_seed`` replaces it for the noise alone (the same grids on other draws).
    ``only``/``outputs``: only these configurations, and their final x
    (``difflab_errors``); ``outputs`` also gets the reference and the starting noise as
    outputs["reference"] and outputs["x_T"]."""
    proc = problem.process
    z = noise(problem, draws, seed if noise_seed is None else noise_seed)
    x_T = z * float(proc.sigma(proc.t_max))
    ref = reference_solution(problem.data, x_T, tol)
    if outputs is not None:
        outputs["reference"], outputs["x_T"] = ref, x_T
    data = problem.data.sample(256, torch.Generator().manual_seed(seed + 1))
    steps = sorted({steps_for(m, c[4], c[0]) for c in CANDIDATES for m in NFES})
    ays = {(order, cs): optimize_schedules(problem.data, data, steps, sigma_min=AYS_FLOOR,
                                           free_end=True, order=order, cauchy_schwarz=cs,
                                           generator=torch.Generator().manual_seed(seed + 2))
           for order, cs in ((1, "sigma"), (1, "min"), (2, "sigma"), (2, "min"), (3, "sigma"))}

    def ays_grid(label, k, m, cs="sigma"):
        return ays[AYS_ORDER.get(label, 2), cs][steps_for(m, k, label)]

    def family_grid(label, k, m):
        if (label, m) not in families:
            return None
        rho, warp, end = families[label, m]
        return grid_family(proc, steps_for(m, k, label), rho, warp,
                           sigma_min=sigma_min(problem) if end is None else end)

    grids = {"default": lambda label, k, m: problem.default_grid(steps_for(m, k, label)),
             "ays": ays_grid, "ays_min": lambda label, k, m: ays_grid(label, k, m, "min"),
             "ays3": lambda label, k, m: (None if label.startswith(LOW_ORDER)
                                          else ays[3, "sigma"][steps_for(m, k, label)]),
             "family": family_grid}
    # Gaussian head: the data Gaussian's exact denoiser above sigma~_skip (moments of the same
    # fresh draws), the AYS grid from sigma~_skip down behind t_max (free: no evaluation)
    moments = data_moments(data)
    s_skip = skip_level(moments)
    if s_skip < 0.5 * float(problem.sigmas[-1]):
        t_max = torch.tensor([float(proc.t_max)], dtype=torch.float64)
        head_ays = {order: optimize_schedules(problem.data, data, steps, sigma_min=AYS_FLOOR,
                                              sigma_max=s_skip, free_end=True, order=order,
                                              generator=torch.Generator().manual_seed(seed + 2))
                    for order in (1, 2)}
        grids["head"] = lambda label, k, m: torch.cat(
            [t_max, head_ays[AYS_ORDER.get(label, 2)][steps_for(m, k, label)]])
    needs_ems = only is None or any(lab.startswith("dpm_solver_v3") for lab in only)
    stats = problem_statistics(problem, 10_000 + seed) if needs_ems else None
    ours, our_halves = difflab_errors(problem, x_T, ref, grids, stats,
                                      lambda model: GaussianHead(model, moments, s_skip),
                                      only, outputs)
    theirs, their_halves = diffusers_errors(problem, vp_state(problem, x_T), ref, only,
                                            outputs)
    return {"difflab": ours, "diffusers": theirs,
            "difflab_halves": our_halves, "diffusers_halves": their_halves}


def quiet_diffusers() -> None:
    import warnings

    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=24,
                        help="problems in all (half fit, half held out)")
    parser.add_argument("--draws", type=int, default=256, help="noise draws per problem")
    parser.add_argument("--fit-draws", type=int, default=64,
                        help="noise draws per FIT problem")
    parser.add_argument("--tol", type=float, default=1e-9, help="reference DOP853 tolerance")
    parser.add_argument("--seed-base", type=int, default=1000,
                        help="problem i is draw_problem(seed_base + i); >= 1024 for a fresh set")
    parser.add_argument("--readme", action="store_true", help="write benchmarks/README.md")
    parser.add_argument("--save", type=Path, help="also write every error as JSON here")
    parser.add_argument("--load", type=Path,
                        help="report (and --readme) a JSON written by --save, without running")
    parser.add_argument("--compare", type=Path, nargs="*",
                        help="with --load: also state the goal status of these other saved "
                             "runs")
    args = parser.parse_args()
    if args.problems < 2 or args.draws < 1 or args.fit_draws < 1:
        raise SystemExit("--problems must be >= 2 and --draws, --fit-draws >= 1")
    torch.set_num_threads(1)
    if args.load:
        return report_saved(args)
    quiet_diffusers()
    t0 = time.perf_counter()
    fit = [draw_problem(args.seed_base + i) for i in range(0, args.problems, 2)]
    held = [draw_problem(args.seed_base + i) for i in range(1, args.problems, 2)]
    families = fit_families(fit, args.fit_draws, args.tol)
    print(f"family fit: {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for i, p in enumerate(held):
        results.append(evaluate(p, 5000 + i, args.draws, args.tol, families))
        print(f"held-out {i}: {p.name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    text = report(results, held, families, args, seconds)
    print(text)
    if args.save:
        args.save.write_text(json.dumps({"problems": [p.name for p in held],
                                         "results": rounded(results),
                                         "families": [[*k, *v] for k, v in families.items()],
                                         "seconds": seconds, "failed": FAILED,
                                         "seed_base": args.seed_base,
                                         "draws": args.draws}))
    publish(args, text)


def rounded(v):
    """``v`` (nested dicts and lists of floats) with every float to 7 significant digits: the
    saved errors, far finer than any ratio the tables print, in half the space."""
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [rounded(x) for x in v]
    return float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v


def report_saved(args) -> None:
    """The tables of a run saved with --save (JSON turns the NFE keys into strings)."""
    saved, results = load_results(args.load)
    held = [argparse.Namespace(name=name) for name in saved["problems"]]
    families = {(f[0], f[1]): tuple(f[2:]) for f in saved["families"]}
    FAILED[:] = saved.get("failed", [])
    args.seed_base = saved.get("seed_base", 1000)
    text = report(results, held, families, args, saved.get("seconds", math.nan))
    for other in args.compare or []:
        text = text.replace("\n\n### Best difflab", f"\n\n{compare_line(other)}"
                            "\n\n### Best difflab", 1)
    print(text)
    publish(args, text)


def publish(args, text: str) -> None:
    if args.readme:
        path = write_section(Path(__file__).with_name("README.md"), HEADING,
                             README_INTRO + text, INDEX_ROW, "sampler_family.py")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
