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
from pathlib import Path

import torch

from ..pipeline import Pipeline
from ..samplers import ems_lambdas, ems_statistics, get_sampler
from ..samplers.generate import generate
from ..training import pick_device
from .outputs import add_overwrite_option, check_outputs


def add_ems_stats_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ems-stats", help="DPM-Solver-v3's empirical model statistics of a trained model",
        description="Estimate the empirical model statistics (l, s, b) of DPM-Solver-v3 for "
                    "a trained model from its own samples, for 'difflab sample --sampler "
                    "dpm_solver_v3 --sampler-opt statistics=PATH'.")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    p.add_argument("--out", default=None,
                   help="output safetensors (default: RUN/ems.safetensors beside the run)")
    add_overwrite_option(p)
    p.add_argument("--draws", type=int, default=256, help="model samples the statistics "
                   "average over (9 network evaluations per draw and knot)")
    p.add_argument("--knots", type=int, default=64, help="lambda knots")
    p.add_argument("--sampler", default="dpmpp_3m", help="sampler drawing the samples")
    p.add_argument("--sample-steps", type=int, default=50, help="its steps")
    p.add_argument("--shared", action="store_true",
                   help="one l and s per knot for all entries (fewer draws suffice)")
    p.add_argument("--fd-step", type=float, default=1e-3,
                   help="finite-difference step (lambda units; x steps are this times sigma)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use raw weights, not the EMA")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_ems_stats)


def run_ems_stats(args: argparse.Namespace) -> int:
    for flag, value in (("--draws", args.draws), ("--sample-steps", args.sample_steps),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.draws < 2 or args.knots < 2:
        raise ValueError("--draws and --knots must be at least 2")
    out = Path(args.out) if args.out else (
        Path(args.checkpoint) if Path(args.checkpoint).is_dir() else
        Path(args.checkpoint).parent) / "ems.safetensors"
    check_outputs(args, out=out)
    sampler = get_sampler(args.sampler)
    device = pick_device(args.device)
    pipe = Pipeline.from_pretrained(args.checkpoint, device=device,
                                    ema=False if args.no_ema else None)
    if pipe.is_text:
        raise ValueError("ems-stats supports unconditional and class-conditional models (the "
                         "unconditional branch); this model takes prompts")
    den = pipe.denoiser(clip=False)
    t0 = time.perf_counter()
    seeds = range(args.seed, args.seed + args.draws)
    x0 = generate(den, sampler, pipe.sample_shape, list(seeds), steps=args.sample_steps,
                  batch_size=args.batch_size, device=device, progress=False)
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
