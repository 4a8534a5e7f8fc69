"""``difflab ems-stats``: DPM-Solver-v3's empirical model statistics of a trained model.

The statistics l, s, b (``difflab.samplers.ems``) are expectations over the model's marginals
p_lambda; they are estimated on forward-process draws alpha x0 + sigma z from x0 drawn by the
model itself (``--draws`` samples with ``--sampler`` at ``--sample-steps``, unconditional
branch), at ``--knots`` lambdas evenly spaced from t_max to the smallest default noise level.
``difflab sample --sampler dpm_solver_v3 --sampler-opt statistics=PATH`` reads the result.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..samplers import ems_lambdas, ems_statistics
from .model_draws import (
    add_model_draw_options,
    check_model_draw_options,
    draw_model_samples,
)
from .outputs import add_overwrite_option, check_outputs, output_beside_run


def add_ems_stats_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ems-stats", help="DPM-Solver-v3's empirical model statistics of a trained model",
        description="Estimate the empirical model statistics (l, s, b) of DPM-Solver-v3 for "
                    "a trained model from its own samples, for 'difflab sample --sampler "
                    "dpm_solver_v3 --sampler-opt statistics=PATH'.")
    add_model_draw_options(p, 256, " (9 network evaluations per draw and knot)")
    p.add_argument("--out", default=None,
                   help="output safetensors (default: RUN/ems.safetensors beside the run)")
    add_overwrite_option(p)
    p.add_argument("--knots", type=int, default=64, help="lambda knots")
    p.add_argument("--shared", action="store_true",
                   help="one l and s per knot for all entries (fewer draws suffice)")
    p.add_argument("--fd-step", type=float, default=1e-3,
                   help="finite-difference step (lambda units; x steps are this times sigma)")
    p.set_defaults(func=run_ems_stats)


def run_ems_stats(args: argparse.Namespace) -> int:
    check_model_draw_options(args)
    if args.knots < 2:
        raise ValueError("--knots must be at least 2")
    out = output_beside_run(args, "ems.safetensors")
    check_outputs(args, out=out)
    t0 = time.perf_counter()
    den, x0, device = draw_model_samples(args, "ems-stats")
    g = torch.Generator().manual_seed(args.seed + args.draws)
    stats = ems_statistics(den, x0.to(device), ems_lambdas(den.process, args.knots),
                           generator=g, fd_step=args.fd_step, shared=args.shared,
                           batch_size=args.batch_size)
    stats.meta.update(checkpoint=str(args.checkpoint), sampler=args.sampler,
                      sample_steps=args.sample_steps, seed=args.seed)
    stats.save(out)
    print(f"statistics at {args.knots} knots from {args.draws} model samples "
          f"({time.perf_counter() - t0:.0f} s)\nwrote {out}  (use: difflab sample --checkpoint "
          f"{args.checkpoint} --sampler dpm_solver_v3 --sampler-opt statistics={out})")
    return 0
