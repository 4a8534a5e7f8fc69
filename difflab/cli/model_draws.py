"""Samples drawn from a trained model to estimate statistics of it (``difflab ems-stats``,
``difflab moments``): the shared options and the draw."""

from __future__ import annotations

import argparse

import torch

from ..parameterization import DenoiserFn
from ..pipeline import Pipeline
from ..samplers import get_sampler
from ..samplers.generate import generate
from ..training import pick_device


def add_model_draw_options(p: argparse.ArgumentParser, draws: int, per_draw: str) -> None:
    """--checkpoint, --draws (default ``draws``; ``per_draw`` says what each costs beyond the
    sample), --sampler, --sample-steps, --batch-size, --seed, --no-ema, --device."""
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    p.add_argument("--draws", type=int, default=draws,
                   help=f"model samples the statistics average over{per_draw}")
    p.add_argument("--sampler", default="dpmpp_3m", help="sampler drawing the samples")
    p.add_argument("--sample-steps", type=int, default=50, help="its steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use raw weights, not the EMA")
    p.add_argument("--device", default="auto")


def check_model_draw_options(args: argparse.Namespace) -> None:
    for flag, value in (("--sample-steps", args.sample_steps),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.draws < 2:
        raise ValueError(f"--draws must be at least 2, got {args.draws}")
    get_sampler(args.sampler)  # an unknown name fails before the model loads


def draw_model_samples(args: argparse.Namespace, command: str
                       ) -> tuple[DenoiserFn, torch.Tensor, torch.device]:
    """(the model's unguided unclipped denoiser, ``--draws`` samples [n, *sample_shape] from
    seeds --seed.., device); text models are refused (``command`` names the caller)."""
    device = pick_device(args.device)
    pipe = Pipeline.from_pretrained(args.checkpoint, device=device,
                                    ema=False if args.no_ema else None)
    if pipe.is_text:
        raise ValueError(f"{command} supports unconditional and class-conditional models (the "
                         "unconditional branch); this model takes prompts")
    den = pipe.denoiser(clip=False)
    seeds = range(args.seed, args.seed + args.draws)
    x0 = generate(den, get_sampler(args.sampler), pipe.sample_shape, list(seeds),
                  steps=args.sample_steps, batch_size=args.batch_size, device=device,
                  progress=False)
    return den, x0, device
