"""``difflab fit-grid``: a sampler's time grid fitted to a trained model and saved beside it.

The fit follows ``difflab.samplers.optimize``: draw a pool of starting noises, keep the most
sensitive ones and a weighted sample of the others (``stratified_draws``), solve the model's
own probability-flow ODE from them accurately (``reference_solution``), then refine the
default grid and the best three-piece grid by Nelder-Mead and keep the better
(``fit_grid``). ``--method ays`` instead minimises the Align-Your-Steps error bound of the
model's probability-flow ODE (``optimize_schedule``, bound of the sampler's order,
``schedule_order``): no reference solutions and nothing fitted to draws, so it cannot overfit
them; its data variance comes from the model's own samples. Then the held-out check: the
fitted and the default grid are run on fresh validation draws from another seed
(``--validation-seed``, default ``--seed`` + 1), never seen by the fit, and a fitted grid
less accurate there than the default is refused (exit status 2, one line with both errors,
nothing written): a grid that overfits its training draws is worse than no fit.
``difflab sample --grid`` reads the result.

Beside the JSON goes a PNG of the validation RMS error against the number of network
evaluations (NFE), log-log, for the default and the fitted grid: one point each for this fit,
joined by the grids fitted before for the same sampler (other ``--steps``) in the same folder,
so fitting a few step counts draws the error-versus-NFE curves.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch

from ..io import LoadError, read_json
from ..pipeline import Pipeline
from ..samplers import (
    ODE_SAMPLERS,
    dpmpp_3m,
    get_sampler,
    optimize_schedule,
    save_time_grid,
    schedule_order,
    time_grid,
)
from ..samplers.optimize import (
    FIT_STARTS,
    fit_grid,
    reference_solution,
    stratified_draws,
    weighted_rms,
)
from ..training import pick_device
from .outputs import add_overwrite_option, check_outputs, output_beside_run
from .plot import plot_error_vs_nfe
from .progress import ProgressDenoiser
from .sampler_args import add_sampler_opt, sampler_options_from_args

FIXED_GRID_SAMPLERS = tuple(s for s in ODE_SAMPLERS if s != "rk45")


def add_fit_grid_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit-grid", help="fit a deterministic sampler's time grid to a trained model",
        description="Fit the time grid of a deterministic sampler for a given number of "
                    "steps to a trained model: the grid whose samples are closest to the "
                    "model's own accurate probability-flow ODE solutions. Writes a JSON grid "
                    "for 'difflab sample --grid'.")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    p.add_argument("--sampler", default="plms", choices=FIXED_GRID_SAMPLERS)
    p.add_argument("--steps", type=int, default=10, help="sampler steps of the grid")
    add_sampler_opt(p)
    p.add_argument("--out", default=None,
                   help="output JSON (default: RUN/grids/SAMPLER_STEPS.json beside the run)")
    add_overwrite_option(p)
    p.add_argument("--method", default="fit", choices=("fit", "ays"),
                   help="fit: refine the grid on the model's own ODE solutions (Nelder-Mead); "
                        "ays: minimise the Align-Your-Steps error bound of the model's "
                        "probability-flow ODE (no references, nothing fitted to draws)")
    p.add_argument("--order", type=int, default=None,
                   help="ays: the order of the bound (default: the sampler's, at most 3)")
    p.add_argument("--trajectories", type=int, default=64,
                   help="ays: probability-flow ODE trajectories the bound averages over")
    p.add_argument("--pool", type=int, default=512, help="noise draws ranked for sensitivity")
    p.add_argument("--hard", type=int, default=48, help="most sensitive draws kept")
    p.add_argument("--easy", type=int, default=48, help="other draws kept (weighted)")
    p.add_argument("--validation", type=int, default=64,
                   help="fresh draws to check the grid on; a fitted grid worse than the "
                        "default on them is refused")
    p.add_argument("--validation-seed", type=int, default=None,
                   help="seed of the validation draws (default: --seed + 1)")
    p.add_argument("--tol", type=float, default=1e-5, help="reference ODE solver tolerance")
    p.add_argument("--evals", type=int, default=200, help="Nelder-Mead evaluations")
    p.add_argument("--starts", default="both", choices=FIT_STARTS,
                   help="fit: the grids Nelder-Mead refines, keeping the better: the default "
                        "grid, the best three-piece grid (a search that runs the sampler once "
                        "per break pair and split of the steps, 225 runs at 8 steps), or both")
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="fit for this class (default: the unconditional branch)")
    p.add_argument("--guidance", type=float, default=None,
                   help="fit the classifier-free guided model at this scale (needs --class)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use raw weights, not the EMA")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to the data range")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it counts network evaluations)")
    p.set_defaults(func=run_fit_grid)


class _FixedLabel:
    """A denoiser with every call conditioned on one class label."""

    def __init__(self, denoiser, label: int):
        self.inner, self.process, self.label = denoiser, denoiser.process, label

    def __call__(self, x, t, cond=None):
        y = torch.full((x.shape[0],), self.label, dtype=torch.long, device=x.device)
        return self.inner(x, t, y)


#: the curve of each --method in the error-against-NFE plot
FITTED = {"fit": "fitted grid", "ays": "AYS grid"}


def error_curves(out: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Validation RMS against NFE of the default and the fitted grids saved in ``out``'s
    folder that were fitted like ``out`` (sampler, its options, class, guidance, clipping,
    checkpoint, method); ``out`` itself included."""
    def made_as(grid: dict) -> tuple:
        return (*(grid.get(k) for k in ("sampler", "sampler_options", "label", "guidance",
                                       "clip", "checkpoint")), grid.get("method", "fit"))

    this = read_json(out)
    method = this.get("method", "fit")
    curves: dict[str, tuple[list[float], list[float]]] = {"default grid": ([], []),
                                                          FITTED[method]: ([], [])}
    for path in sorted(out.parent.glob("*.json")):
        try:
            grid = read_json(path)
        except LoadError:
            continue
        if not isinstance(grid, dict) or "nfe" not in grid or made_as(grid) != made_as(this):
            continue
        for name, key in (("default grid", "default_validation_rms"),
                          (FITTED[method], "validation_rms")):
            curves[name][0].append(float(grid["nfe"]))
            curves[name][1].append(float(grid[key]))
    return curves


#: what to try when a grid of each --method is refused
RETRY = {"fit": "fit on more draws, --pool/--hard/--easy",
         "ays": "another --order or more --trajectories"}


def check_held_out(fitted: float, default: float, n: int, method: str = "fit") -> None:
    """Refuse a fitted grid whose validation RMS ``fitted`` is above the default grid's
    ``default`` on ``n`` held-out draws: a one-line ValueError with both errors."""
    if not fitted <= default:
        raise ValueError(f"the {FITTED[method]} is worse than the default on {n} held-out "
                         f"validation draws (RMS {fitted:.4e} vs {default:.4e}); not saved "
                         f"(try {RETRY[method]}, or keep the default grid)")


def _load_denoiser(args: argparse.Namespace, device) -> tuple[ProgressDenoiser, tuple]:
    """The model's denoiser as fit-grid runs it (guidance, clipping, one class, a progress
    bar of its evaluations) and its sample shape; text models and bad --class refused."""
    pipe = Pipeline.from_pretrained(args.checkpoint, device=device,
                                    ema=False if args.no_ema else None)
    den = pipe.denoiser(guidance=args.guidance, clip=not args.no_clip)
    if pipe.is_text:
        raise ValueError("fit-grid fits unconditional and class-conditional models; this "
                         "model takes prompts")
    if args.label is not None:
        n_classes = len(pipe.class_names)
        if not 0 <= args.label < n_classes:
            raise ValueError(f"--class must be in 0..{n_classes - 1} for this model"
                             if n_classes else "--class needs a class-conditional model")
        den = _FixedLabel(den, args.label)
    return (ProgressDenoiser(den, desc="fit-grid", unit="NFE", disable=args.no_progress),
            pipe.sample_shape)


def _make_grid(args: argparse.Namespace, den, sampler, options: dict, noise, g, default):
    """(grid, [default's, grid's] training RMS (None for AYS: no training draws), what the
    JSON records of the method) by --method; ``noise(n)`` draws n starting states."""
    t0 = time.perf_counter()
    if args.method == "ays":
        order = args.order or schedule_order(args.sampler, options)
        # the bound needs the data's variance only: the model's own samples (25 DPM-Solver++
        # 3M steps), then the trajectories of the bound from fresh noise of the same seed
        data = dpmpp_3m(den, noise(args.trajectories), time_grid(den.process, 25))
        ts = optimize_schedule(den, data, args.steps, order=order, free_end=True, generator=g)
        print(f"AYS bound of order {order} on {args.trajectories} trajectories "
              f"({time.perf_counter() - t0:.0f} s)")
        return ts, [None, None], {"method": "ays", "order": order,
                                  "trajectories": args.trajectories}
    x, w = stratified_draws(den, noise(args.pool), args.hard, args.easy, g)
    ref = reference_solution(den, x, args.tol)
    print(f"references: {len(x)} training draws ({time.perf_counter() - t0:.0f} s; "
          f"{args.validation} validation draws before them)")
    ts, fitted_train = fit_grid(den, sampler, args.steps, x, ref, w, max_evals=args.evals,
                                starts=args.starts)
    extra = {} if args.starts == "both" else {"starts": args.starts}
    return ts, [weighted_rms(sampler(den, x, default), ref, w), fitted_train], extra


def _check_args(args: argparse.Namespace) -> None:
    """One-line errors for option values out of range, before anything loads."""
    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2 to have a grid to fit, got {args.steps}")
    if args.guidance is not None and args.label is None:
        raise ValueError("--guidance needs --class: guidance pushes towards one class")
    if args.validation < 1:
        raise ValueError(f"--validation must be at least 1, got {args.validation}")
    if not args.tol > 0:
        raise ValueError(f"--tol must be > 0, got {args.tol}")
    if args.evals < 0:
        raise ValueError(f"--evals must be at least 0, got {args.evals}")
    if args.order is not None and args.order < 1:
        raise ValueError(f"--order must be at least 1, got {args.order}")
    if args.trajectories < 2:
        raise ValueError(f"--trajectories must be at least 2, got {args.trajectories}")
    if args.method == "fit" and not (0 <= args.hard < args.pool
                                     and 0 < args.easy <= args.pool - args.hard):
        raise ValueError(f"need 0 <= --hard < --pool and 0 < --easy <= --pool - --hard, got "
                         f"--pool {args.pool}, --hard {args.hard}, --easy {args.easy}")


def run_fit_grid(args: argparse.Namespace) -> int:
    _check_args(args)
    out = output_beside_run(args, f"grids/{args.sampler}_{args.steps}.json")
    plot = out.with_suffix(".png")
    check_outputs(args, out=out, plot=plot)
    options = sampler_options_from_args(args)
    device = pick_device(args.device)
    den, shape = _load_denoiser(args, device)
    process = den.process
    sampler = functools.partial(get_sampler(args.sampler), **options)
    g = torch.Generator().manual_seed(args.seed)
    val_seed = args.seed + 1 if args.validation_seed is None else args.validation_seed
    g_val = torch.Generator().manual_seed(val_seed)
    sigma_max = float(process.sigma(process.t_max))

    def noise(n: int, gen: torch.Generator) -> torch.Tensor:
        return (torch.randn((n, *shape), generator=gen) * sigma_max).to(device)

    x_val = noise(args.validation, g_val)
    ref_val = reference_solution(den, x_val, args.tol)
    default = time_grid(process, args.steps)
    ts, train, extra = _make_grid(args, den, sampler, options, lambda n: noise(n, g), g,
                                  default)
    calls = den.calls
    fitted_val = weighted_rms(sampler(den, x_val, ts), ref_val)
    nfe = den.calls - calls  # of one sampling run on the grid (batched)
    rows = [("default", train[0], weighted_rms(sampler(den, x_val, default), ref_val)),
            ("fitted" if args.method == "fit" else "ays", train[1], fitted_val)]
    den.close()
    print("| grid | training RMS (weighted) | validation RMS |\n|---|---|---|")
    for name, tr, va in rows:
        print(f"| {name} | {'-' if tr is None else f'{tr:.4e}'} | {va:.4e} |")
    check_held_out(rows[1][2], rows[0][2], len(x_val), args.method)
    save_time_grid(ts, out, sampler=args.sampler, steps=args.steps, checkpoint=str(
        args.checkpoint), label=args.label, guidance=args.guidance, clip=not args.no_clip,
        train_rms=rows[1][1], validation_rms=rows[1][2], default_validation_rms=rows[0][2],
        nfe=nfe, validation_seed=val_seed, **extra,
        **({"sampler_options": options} if options else {}))
    curves = error_curves(out)
    plot_error_vs_nfe(curves, plot, f"{args.sampler} grids of {args.checkpoint}",
                      "validation RMS to the ODE solution")
    print(f"wrote {plot} (error against NFE, {len(curves[FITTED[args.method]][0])} grid(s) "
          f"of {out.parent})")
    opts = "".join(f" --sampler-opt {k}={v}" for k, v in options.items())
    print(f"times: {[round(float(t), 2) for t in ts]}\nwrote {out}  (use: difflab sample "
          f"--checkpoint {args.checkpoint} --sampler {args.sampler}{opts} --grid {out})")
    return 0
