"""``difflab sample``: images from a checkpoint as a PNG grid and optionally an .npz."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..data import from_uint8, to_uint8
from ..pipeline import Conditions, Pipeline, PipelineOutput
from ..samplers import SAMPLERS, SPACINGS, check_sampler_options, load_time_grid
from ..training import pick_device
from ..training.distributed import (
    gather_to_main,
    init_distributed,
    local_slice,
    process_group,
)
from .adapters import add_adapter_option, add_adapters, parse_adapters
from .control import add_control_options, apply_control_args
from .outputs import add_overwrite_option, check_outputs
from .sampler_args import add_sampler_opt, sampler_options_from_args

#: the shortcut flags of --sampler-opt (an option only when given)
SHORTCUTS = ("eta", "variance", "order", "churn")


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample images from a trained model",
                       description="Sample images from a checkpoint and write a PNG grid. "
                                   "Image i uses seed --seed + i, so results do not depend on "
                                   "--batch-size.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="pipeline folder (model_card.json), run folder, its checkpoints/ "
                        "folder, or a step_*.json file")
    p.add_argument("--n", type=int, default=None,
                   help="number of images (default: 10 per class, or 64)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help="sampler (default: the model's own -- a distilled student's -- else "
                        "ddim)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model's own sampler's, else 50)")
    p.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="time grid (default: trailing for discrete schedules, else uniform)")
    p.add_argument("--grid", default=None,
                   help="JSON time grid (samplers.save_time_grid, or a list of times), e.g. "
                        "one fitted by optimize_grid and saved with the model; replaces --steps "
                        "and --spacing")
    p.add_argument("--gaussian-head", default=None, metavar="MOMENTS",
                   help="moments file from 'difflab moments': noise levels above "
                        "--skip-factor times the data's largest std are answered by that "
                        "Gaussian, at no network evaluation (unconditional models)")
    p.add_argument("--skip-factor", type=float, default=32.0,
                   help="with --gaussian-head: its levels start at this many times the "
                        "data's largest standard deviation")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM stochasticity (default 0: ODE)")
    p.add_argument("--variance", default=None, choices=["auto", "beta", "beta_tilde"],
                   help="DDPM reverse variance (default auto: the learned Sigma_theta of a "
                        "model trained with --objective vlb|hybrid, else beta_tilde)")
    p.add_argument("--order", type=int, default=None,
                   help="solver order (dpm_solver, unipc_*, lms, dpmpp_sde; default: theirs)")
    p.add_argument("--churn", type=float, default=None, help="Heun churn (0: deterministic)")
    add_sampler_opt(p)
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
    add_overwrite_option(p)
    p.add_argument("--no-ema", action="store_true", help="use raw weights, not the EMA")
    add_adapter_option(p)
    p.add_argument("--no-clip", action="store_true",
                   help="do not clip the denoised estimate to the data range")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    add_guidance_options(p)
    add_control_options(p)
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


def resolve_seed_range(args: argparse.Namespace) -> None:
    """Fold ``--seeds A-B`` into ``--seed`` and ``--n`` (they must agree if both given)."""
    if args.seeds is None:
        return
    a, b = args.seeds
    if args.n is not None and args.n != b - a + 1:
        raise ValueError(f"--n {args.n} disagrees with --seeds {a}-{b} ({b - a + 1} seeds)")
    args.seed, args.n = a, b - a + 1


def sample_conditions(args: argparse.Namespace, pipe: Pipeline, classifier: Any
                      ) -> Conditions:
    """The conditions of all images: --prompt rows (--n per prompt, or --seeds split among
    the prompts) or --class labels."""
    if pipe.is_text or args.prompt:
        prompts = args.prompt or [""]
        if args.seeds is not None and args.n % len(prompts):
            raise ValueError(f"--seeds gives {args.n} images, not a multiple of the "
                             f"{len(prompts)} prompts")
        n = args.n if args.seeds is not None else (args.n or 8) * len(prompts)
        return pipe.condition(args.label, prompts, n)
    return pipe.condition(args.label, n=args.n, classifier=classifier)


def resolve_sampler_args(args: argparse.Namespace, pipe: Pipeline) -> dict[str, Any]:
    """Fill ``--sampler`` and ``--steps`` from the model's own sampler where not given (with
    its options unless some are given); the sampler options, checked for that sampler."""
    own, own_steps, own_options = pipe.default_sampler()
    if args.grid:  # a saved time grid fixes the number of steps
        args.steps = len(load_time_grid(args.grid)) - 1
    if args.sampler is None:
        args.sampler = own
        args.steps = own_steps if args.steps is None else args.steps
        options = sampler_options_from_args(args, SHORTCUTS)
        return options or check_sampler_options(own, own_options)
    args.steps = 50 if args.steps is None else args.steps
    return sampler_options_from_args(args, SHORTCUTS)


def run_sample(args: argparse.Namespace) -> int:
    """Sample; under torchrun each rank draws its shard of the seeds and rank 0 writes."""
    resolve_seed_range(args)
    check_outputs(args, out=args.out, save_npz=args.save_npz)
    adapters = parse_adapters(args.adapter)
    info, device = init_distributed(pick_device(args.device))
    with process_group():
        pipe = Pipeline.from_pretrained(args.checkpoint, device=device,
                                        ema=False if args.no_ema else None)
        add_adapters(pipe, adapters, ema=False if args.no_ema else None)
        apply_control_args(args, pipe)
        options = resolve_sampler_args(args, pipe)
        clf = pipe.load_classifier(args.classifier)
        conds = sample_conditions(args, pipe, clf)
        n, part = len(conds), local_slice(len(conds), info)
        out = pipe(cond=conds[part], seeds=list(range(args.seed, args.seed + n))[part],
                   sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                   grid=args.grid, sampler_options=options,
                   guidance=args.guidance, guidance_interval=args.guidance_interval,
                   guidance_rescale=args.guidance_rescale, classifier=clf,
                   classifier_scale=args.classifier_scale,
                   negative_prompt=args.negative_prompt, batch_size=args.batch_size,
                   clip=not args.no_clip, progress=not args.no_progress and info.is_main,
                   gaussian_head=args.gaussian_head, skip_factor=args.skip_factor)
        # images travel as uint8 (what the files hold), 2-D points as floats
        shards = gather_to_main(to_uint8(out.samples) if out.is_image else out.samples, info)
    if shards is None:  # ranks > 0: rank 0 writes
        return 0
    x = torch.cat(shards)
    out = PipelineOutput(samples=from_uint8(x) if out.is_image else x, nrow=conds.nrow,
                         seeds=list(range(args.seed, args.seed + n)), labels=conds.labels,
                         prompts=conds.prompts)
    guidance = "no guidance" if args.guidance is None else f"guidance {args.guidance:g}"
    path = out.save_grid(args.out, labelled=True,
                         class_names=pipe.class_names or getattr(clf, "class_names", None),
                         caption=f"{args.sampler}, {args.steps} steps, {guidance}, "
                                 f"seeds {args.seed}-{args.seed + n - 1}")
    print(f"wrote {n} samples ({args.sampler}, {args.steps} steps) to {path}")
    if args.save_npz:
        print(f"wrote arrays to {out.save_npz(args.save_npz)}")
    return 0
