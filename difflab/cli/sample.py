"""``difflab sample``: images from a checkpoint as a PNG grid and optionally an .npz."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import numpy as np
import torch

from ..conditioning import TextCond
from ..data import from_uint8, save_grid, save_scatter, to_uint8
from ..io import atomic_write
from ..samplers import SAMPLERS, SPACINGS, get_sampler, load_time_grid
from ..samplers.generate import generate
from ..training import pick_device
from ..training.distributed import (
    DistInfo,
    gather_to_main,
    init_distributed,
    local_slice,
    process_group,
)
from .loading import encode_prompts, guided_denoiser


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample images from a trained model",
                       description="Sample images from a checkpoint and write a PNG grid. "
                                   "Image i uses seed --seed + i, so results do not depend on "
                                   "--batch-size.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run folder, its checkpoints/ folder, or a step_*.json file")
    p.add_argument("--n", type=int, default=None,
                   help="number of images (default: 10 per class, or 64)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=50, help="sampler steps (network evaluations)")
    p.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="time grid (default: trailing for discrete schedules, else uniform)")
    p.add_argument("--grid", default=None,
                   help="JSON time grid (samplers.save_time_grid, or a list of times), e.g. "
                        "one fitted by optimize_grid and saved with the model; replaces --steps "
                        "and --spacing")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0: ODE)")
    p.add_argument("--variance", default="auto", choices=["auto", "beta", "beta_tilde"],
                   help="DDPM reverse variance: auto is the learned Sigma_theta of a model "
                        "trained with --objective vlb|hybrid, else beta_tilde")
    p.add_argument("--order", type=int, default=None,
                   help="solver order (dpm_solver, unipc_*, lms, dpmpp_sde; default: theirs)")
    p.add_argument("--churn", type=float, default=None, help="Heun churn (0: deterministic)")
    p.add_argument("--class", dest="label", default="all",
                   help="class index or name to sample, or 'all' for rows of every class")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image")
    p.add_argument("--seeds", type=parse_seeds, default=None, metavar="A-B",
                   help="seed range, inclusive (image i uses seed A + i); sets --seed and, "
                        "if not given, --n. Under torchrun the seeds are split across ranks")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default="samples.png", help="output PNG grid")
    p.add_argument("--save-npz", default=None,
                   help="also write the images (uint8, NHWC) and labels to this .npz")
    p.add_argument("--no-ema", action="store_true", help="use raw weights, not the EMA")
    p.add_argument("--no-clip", action="store_true",
                   help="do not clip the denoised estimate to the data range")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    add_guidance_options(p)
    p.set_defaults(func=run_sample)


def add_guidance_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guidance")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale gamma: eps(null) + gamma (eps(y) - "
                        "eps(null)); 1 = conditional model, 0 = unconditional")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=None,
                   metavar=("T_LO", "T_HI"), help="guide only for times in [T_LO, T_HI]")
    g.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="CFG rescale phi in [0, 1] (Lin et al. 2024)")
    g.add_argument("--classifier", default=None,
                   help="noisy classifier checkpoint (difflab train-classifier) for "
                        "classifier guidance")
    g.add_argument("--classifier-scale", type=float, default=1.0,
                   help="classifier guidance scale s")
    g.add_argument("--prompt", action="append", default=None,
                   help="text prompt for a text-conditional model (e.g. trained with "
                        "--dataset shapes); repeat for several prompts, one row each, --n "
                        "images per prompt (default 8); without it: the empty prompt")
    g.add_argument("--negative-prompt", default=None,
                   help="prompt used as the unconditional branch of --guidance: samples are "
                        "pushed away from it; unset, the empty prompt is")


def class_index(label: str, class_names: list[str]) -> int:
    """``--class`` given as a class name or index -> the index, with a clear error."""
    k = len(class_names)
    if k == 0:
        raise ValueError("--class given but the model is unconditional")
    if label in class_names:
        return class_names.index(label)
    if label.lstrip("-").isdigit() and 0 <= int(label) < k:
        return int(label)
    raise ValueError(f"unknown --class {label!r}; classes are 0..{k - 1}: {class_names}")


def parse_seeds(text: str) -> tuple[int, int]:
    """``"A-B"`` (inclusive, A <= B) or ``"A"`` -> (A, B)."""
    first, _, last = text.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds expects A-B, e.g. 0-49999; got {text!r}") from None
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"--seeds needs 0 <= A <= B; got {text!r}")
    return a, b


def parse_labels(label: str, n: int | None, class_names: list[str]) -> tuple[torch.Tensor | None,
                                                                            int]:
    """Per-image labels for ``--class`` (None for an unconditional model) and the row length."""
    k = len(class_names)
    if k == 0:
        if label != "all":
            raise ValueError("--class given but the model is unconditional")
        return None, 8
    if label == "all":
        n = n or 10 * k
        return torch.arange(n) % k if n < k else torch.arange(k).repeat_interleave(
            -(-n // k))[:n], -(-n // k)
    idx = class_index(label, class_names)
    n = n or 64
    return torch.full((n,), idx), 8


def resolve_seed_range(args: argparse.Namespace) -> None:
    """Fold ``--seeds A-B`` into ``--seed`` and ``--n`` (they must agree if both given)."""
    if args.seeds is None:
        return
    a, b = args.seeds
    if args.n is not None and args.n != b - a + 1:
        raise ValueError(f"--n {args.n} disagrees with --seeds {a}-{b} ({b - a + 1} seeds)")
    args.seed, args.n = a, b - a + 1


def sample_shard(args: argparse.Namespace, denoiser, shape: tuple[int, ...],
                 labels: torch.Tensor | None, n: int, info: DistInfo,
                 device: torch.device) -> torch.Tensor:
    """This rank's contiguous share of the n images (all of them for one process), as
    uint8 NCHW for images (what the files hold) or float for 2-D points."""
    sampler = get_sampler(args.sampler)
    given = (("eta", args.eta), ("variance", args.variance), ("order", args.order),
             ("churn", args.churn))
    opts = {k: v for k, v in given
            if v is not None and k in inspect.signature(sampler).parameters}
    part = local_slice(n, info)
    seeds = list(range(args.seed, args.seed + n))[part]
    ts = load_time_grid(args.grid) if args.grid else None
    x = generate(denoiser, sampler, shape, seeds,
                 labels=None if labels is None else labels[part], steps=args.steps,
                 spacing=args.spacing, ts=ts, batch_size=args.batch_size, device=device,
                 progress=not args.no_progress and info.is_main, **opts)
    return x if len(shape) == 1 else to_uint8(x)


def run_sample(args: argparse.Namespace) -> int:
    """Sample; under torchrun each rank draws its shard of the seeds and rank 0 writes."""
    resolve_seed_range(args)
    if args.grid:  # a saved time grid fixes the number of steps
        args.steps = len(load_time_grid(args.grid)) - 1
    info, device = init_distributed(pick_device(args.device))
    with process_group():
        denoiser, meta = guided_denoiser(
            args.checkpoint, ema=not args.no_ema, device=device, clip=not args.no_clip,
            guidance=args.guidance, guidance_interval=args.guidance_interval,
            guidance_rescale=args.guidance_rescale, classifier=args.classifier,
            classifier_scale=args.classifier_scale, negative_prompt=args.negative_prompt)
        if meta.get("text_encoder") or args.prompt:
            labels, nrow = prompt_conditions(args, meta, device)
        else:
            labels, nrow = parse_labels(args.label, args.n, meta.get("class_names", []))
        n = len(labels) if labels is not None else (args.n or 64)
        cfg = meta["network"]["config"]
        is_2d = meta["network"]["name"] == "mlp"
        shape = (cfg["dim"],) if is_2d else (cfg["in_channels"], cfg["image_size"],
                                              cfg["image_size"])
        shard = sample_shard(args, denoiser, shape, labels, n, info, device)
        shards = gather_to_main(shard, info)
    if shards is None:  # ranks > 0: rank 0 writes
        return 0
    x = torch.cat(shards)
    write_outputs(args, x, labels if torch.is_tensor(labels) else None, n, nrow, is_2d)
    return 0


def prompt_conditions(args: argparse.Namespace, meta: dict, device: torch.device
                      ) -> tuple[TextCond, int]:
    """Token embeddings for ``--n`` images per ``--prompt`` (rows of the grid), and the row
    length."""
    if args.label != "all":
        raise ValueError("--class given but this model takes --prompt")
    prompts = args.prompt or [""]
    if args.seeds is not None and args.n % len(prompts):
        raise ValueError(f"--seeds gives {args.n} images, not a multiple of the "
                         f"{len(prompts)} prompts")
    per = args.n // len(prompts) if args.seeds is not None else (args.n or 8)
    return encode_prompts(meta, [p for p in prompts for _ in range(per)], device), per


def write_outputs(args: argparse.Namespace, x: torch.Tensor, labels: torch.Tensor | None,
                  n: int, nrow: int, is_2d: bool) -> None:
    """The PNG grid (or scatter plot) and the optional .npz of all n samples."""
    if is_2d:
        path = save_scatter(x, args.out)
    else:
        path = save_grid(from_uint8(x), args.out, nrow=nrow, scale=max(1, 64 // x.shape[-1]))
    print(f"wrote {n} samples ({args.sampler}, {args.steps} steps) to {path}")
    if args.save_npz:
        out = Path(args.save_npz)
        arrays = {"images": x.numpy() if is_2d else x.permute(0, 2, 3, 1).numpy(),
                  "labels": (labels if labels is not None else torch.full((n,), -1)).numpy(),
                  "seeds": np.arange(args.seed, args.seed + n)}
        atomic_write(out, lambda tmp: np.savez(open(tmp, "wb"), **arrays))
        print(f"wrote arrays to {out}")
