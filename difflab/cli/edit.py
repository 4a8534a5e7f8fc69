"""``difflab edit sdedit|inpaint|invert|interpolate|vary|prompt2prompt``: editing images with a
checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import editing
from ..data import DataError, load_png, save_labelled_grid
from ..io import atomic_write
from ..pipeline import Pipeline, resolve_sampler
from ..samplers import SAMPLERS, SPACINGS, time_grid
from ..training import pick_device
from .adapters import add_adapter_option, add_adapters, parse_adapters
from .outputs import add_overwrite_option, check_outputs
from .progress import nfe_progress
from .sampler_args import add_sampler_opt, sampler_options_from_args

KINDS = {
    "sdedit": "noise the input to --strength and denoise it (toward --class or --prompt)",
    "inpaint": "regenerate the white part of --mask, keep the rest exactly",
    "invert": "invert the input to noise with an ODE sampler run backwards (--inversion) and "
              "reconstruct it; reports the error",
    "interpolate": "images between --input and --input2 (slerp of inverted noises)",
    "vary": "--n variations of the input at --strength",
    "prompt2prompt": "text models: edit a sample of --prompt (or, with --input, the input "
                     "through null-text inversion) into --target by cross-attention control",
}


def add_edit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="edit images: sdedit, inpaint, invert, interpolate, vary, "
                       "prompt2prompt",
                       description="Edit images with a trained model. " + "; ".join(
                           f"{k}: {v}" for k, v in KINDS.items()) + ".",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("kind", choices=list(KINDS), help="which edit")
    p.add_argument("--checkpoint", required=True, help="run folder or step_*.json")
    p.add_argument("--input", default=None,
                   help="input image (any size: resized, cropped); needed except by "
                        "prompt2prompt, where it is the real image to edit")
    p.add_argument("--input2", help="second image, for interpolate")
    p.add_argument("--mask", help="mask image for inpaint: white = regenerate")
    p.add_argument("--strength", type=float, default=0.6,
                   help="sdedit/vary: share of the noise range to go back (0: unchanged)")
    p.add_argument("--class", dest="label", default=None, help="class to edit toward")
    p.add_argument("--prompt", default=None,
                   help="text prompt to edit toward, for a text-conditional model (e.g. "
                        "trained with --dataset shapes); unset: the empty prompt")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--spacing", default=None, choices=SPACINGS)
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta (default: 0, and 1 for inpaint as in RePaint)")
    add_sampler_opt(p)
    p.add_argument("--jump-length", type=int, default=0, help="RePaint: jump back this far")
    p.add_argument("--jump-n-sample", type=int, default=1, help="RePaint: passes per jump")
    p.add_argument("--n", type=int, default=8, help="vary: variations; interpolate: frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="edit.png", help="output PNG grid (input first)")
    p.add_argument("--save-npz", default=None, help="invert: also save the noise here")
    add_overwrite_option(p)
    p.add_argument("--inversion", default="ddim", choices=editing.METHODS,
                   help="invert: deterministic sampler run backwards on the grid (and "
                   "forwards to reconstruct)")
    add_adapter_option(p)
    add_prompt2prompt_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_edit)


def add_prompt2prompt_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt2prompt (Hertz et al. 2022; null-text inversion, Mokady "
                             "et al. 2023)")
    g.add_argument("--target", default=None, help="the edited prompt (--prompt: the source)")
    g.add_argument("--reweight", action="append", default=[], metavar="WORD=FACTOR",
                   help="scale the target's cross-attention to WORD by FACTOR, repeatable")
    g.add_argument("--cross-steps", type=float, default=0.8,
                   help="share of the steps (from the noise end) in which the target takes "
                        "the source's cross-attention maps")
    g.add_argument("--self-steps", type=float, default=0.0,
                   help="share of the steps in which the target takes the source's "
                        "self-attention maps (keeps the layout)")
    g.add_argument("--mode", default="auto", choices=["auto", "replace", "refine"],
                   help="word swap (replace), added words (refine), or auto: replace when the "
                        "prompts have as many words")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale gamma of the edit (default 5)")
    g.add_argument("--null-iters", type=int, default=10,
                   help="with --input: Adam iterations per step of null-text inversion")


def _image(path: str, pipe: Pipeline, device: torch.device) -> torch.Tensor:
    if len(pipe.image_shape) != 3:
        raise ValueError("difflab edit works on image models; this checkpoint is "
                         f"{pipe.stage.network!r}")
    channels, _, size = pipe.image_shape
    return load_png(path, channels, resolution=size)[None].to(device)


def _cond(args: argparse.Namespace, pipe: Pipeline) -> Any:
    """The condition of the edit: a class label, or for a text model the token embeddings of
    ``--prompt`` (the empty prompt, the model's trained null, when none is given); neither:
    the null condition."""
    labels = None if args.label is None else [args.label]  # one image; names or indices
    return pipe.condition(labels, args.prompt, n=1).cond


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Options of --sampler (sdedit and vary run it; inpaint takes --eta itself)."""
    if args.kind in ("sdedit", "vary", "prompt2prompt"):
        return sampler_options_from_args(args, ("eta",))
    if args.sampler_opt:
        raise ValueError(f"--sampler-opt applies to sdedit and vary (and prompt2prompt), not "
                         f"{args.kind}")
    return {}


def parse_reweight(items: list[str]) -> dict[str, float]:
    """``--reweight WORD=FACTOR`` items -> {word: factor}."""
    out = {}
    for item in items:
        word, sep, value = item.rpartition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = None
        if not sep or not word.strip() or factor is None:
            raise ValueError(f"--reweight takes WORD=FACTOR (e.g. red=2), got {item!r}")
        out[word.strip()] = factor
    return out


def check_prompt2prompt_args(args: argparse.Namespace) -> None:
    """prompt2prompt's own options, before the model is loaded."""
    if args.kind != "prompt2prompt":
        for flag, value in (("--target", args.target), ("--reweight", args.reweight or None),
                            ("--guidance", args.guidance)):
            if value is not None:
                raise ValueError(f"{flag} applies to prompt2prompt, not {args.kind}")
        return
    if args.prompt is None or args.target is None:
        raise ValueError("prompt2prompt needs --prompt (the source) and --target")
    if args.label is not None:
        raise ValueError("prompt2prompt edits prompts of a text model; --class does not apply")
    for flag, value in (("--cross-steps", args.cross_steps), ("--self-steps", args.self_steps)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} must be in [0, 1], got {value}")
    if args.guidance is None:
        args.guidance = 5.0
    if args.guidance < 1:
        raise ValueError(f"--guidance must be at least 1, got {args.guidance}")
    if args.null_iters < 0:
        raise ValueError(f"--null-iters must be >= 0, got {args.null_iters}")
    if args.input is not None and args.sampler != "ddim":
        raise ValueError("--input (null-text inversion) edits with --sampler ddim")
    parse_reweight(args.reweight)


def check_edit_args(args: argparse.Namespace) -> None:
    """What can be refused before the model is loaded: missing inputs, counts, outputs."""
    check_prompt2prompt_args(args)
    if args.kind != "prompt2prompt" and args.input is None:
        raise ValueError(f"{args.kind} needs --input")
    for flag in ("input", "input2", "mask"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise DataError(f"--{flag}: image file does not exist: {path}")
    if args.kind == "inpaint" and not args.mask:
        raise ValueError("inpaint needs --mask (white = regenerate)")
    if args.kind == "interpolate" and not args.input2:
        raise ValueError("interpolate needs --input2")
    least = {"vary": 1, "interpolate": 2}.get(args.kind)
    if least is not None and args.n < least:
        raise ValueError(f"--n must be at least {least} for {args.kind}, got {args.n}")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    check_outputs(args, out=args.out,
                  save_npz=args.save_npz if args.kind == "invert" else None)


def strip_text(args: argparse.Namespace, n_out: int) -> tuple[list[str], str]:
    """Column labels of the edit strip (the inputs, then the results) and its caption."""
    results = {
        "sdedit": ["result"], "inpaint": ["kept part", "result"],
        "invert": ["noise", "reconstruction"],
        "vary": [f"seed {args.seed + i}" for i in range(n_out)],
        "interpolate": ["input 2"] + [f"{float(v):.2f}" for v in torch.linspace(0, 1, n_out)],
    }[args.kind]
    if args.kind == "invert":
        how = f"{args.inversion} inversion, {args.steps} steps"
    elif args.kind == "interpolate":
        how = f"slerp of inverted noises, {args.steps} steps"
    elif args.kind == "inpaint":
        how = f"RePaint, {args.steps} steps, seed {args.seed}"
    else:
        how = f"strength {args.strength:g}, {args.sampler} {args.steps} steps, seed {args.seed}"
    toward = "".join(f", {k} {v}" for k, v in (("class", args.label), ("prompt", args.prompt))
                     if v is not None)
    return ["input", *results], f"{args.kind}: {how}{toward}"


def run_edit(args: argparse.Namespace) -> int:
    check_edit_args(args)
    adapters = parse_adapters(args.adapter)
    device = pick_device(args.device)
    pipe = Pipeline.from_pretrained(args.checkpoint, device=device)
    add_adapters(pipe, adapters)
    if args.kind == "prompt2prompt":
        return run_prompt2prompt(args, pipe, device)
    with nfe_progress(pipe.denoiser(), f"edit {args.kind}", not args.no_progress) as den:
        x, out = _run_kind(args, pipe, den, device)
    grid = torch.cat([x, out]).float().cpu()
    labels, caption = strip_text(args, len(out))
    path = save_labelled_grid(grid, args.out, nrow=len(grid), scale=max(1, 64 // grid.shape[-1]),
                              col_labels=labels, caption=caption)
    print(f"wrote {args.kind} result ({len(out)} images after {len(x)} input(s)) to {path}")
    return 0


def _run_kind(args: argparse.Namespace, pipe: Pipeline, den: Any, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit of ``args.kind``: (what the strip shows first, the results), as images. A
    latent model edits the encoded inputs (``pipe.encode``) and decodes the results."""
    x = _image(args.input, pipe, device)
    z = pipe.encode(x)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sampler, options = resolve_sampler(args.sampler, _options(args))
    ts = time_grid(den.process, args.steps, args.spacing)
    cond = _cond(args, pipe)
    if args.kind == "sdedit":
        out = pipe.decode(editing.sdedit(den, z, args.strength, sampler, args.steps, gen,
                                         cond=cond, spacing=args.spacing, **options))
    elif args.kind == "vary":
        seeds = list(range(args.seed, args.seed + args.n))
        out = pipe.decode(editing.variations(den, z, seeds, args.strength, sampler, args.steps,
                                             cond=cond, spacing=args.spacing, **options))
    elif args.kind == "inpaint":
        mask = editing.load_mask(args.mask, args.input, pipe.image_shape[-1]).to(device)
        eta = 1.0 if args.eta is None else args.eta
        out = pipe.decode(editing.inpaint(
            den, z, editing.latent_mask(mask, z.shape[-1]), ts, gen, cond=cond, eta=eta,
            jump_length=args.jump_length, jump_n_sample=args.jump_n_sample))
        out = torch.where(mask.bool(), out, x)  # the kept part exactly (latent: re-pasted)
        x = torch.cat([x, torch.where(mask.bool(), -1.0, x)])  # show input and kept part
    elif args.kind == "invert":
        noise = editing.ode_invert(den, z, ts, args.inversion, cond=cond)
        out = pipe.decode(editing.reconstruct(den, noise, ts, args.inversion, cond=cond))
        rmse = float((out - x).pow(2).mean().sqrt())
        via = " (through the autoencoder)" if pipe.is_latent else ""
        print(f"inversion + reconstruction with {args.steps} {args.inversion} steps: RMSE "
              f"{rmse:.5f} (data range [-1, 1]){via}")
        if args.save_npz:
            arr = noise.cpu().numpy()
            atomic_write(Path(args.save_npz), lambda tmp: np.savez(open(tmp, "wb"), noise=arr))
        out = torch.cat([noise_preview(noise, x.shape), out])
    else:  # interpolate
        x2 = _image(args.input2, pipe, device)
        lams = torch.linspace(0, 1, args.n)
        out = pipe.decode(editing.interpolate(den, z, pipe.encode(x2), lams, ts, cond=cond))
        x = torch.cat([x, x2])
    return x, out


def noise_preview(noise: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverted noise [B, c, h, w] shown as images of ``shape`` [B, C, H, W]: clamped to
    [-1, 1]; latents (other channels or size) as their first C channels (the first one
    repeated if fewer), upsampled by nearest neighbours."""
    if noise.shape[1:] == shape[1:]:
        return noise.clamp(-1, 1)
    c = shape[1]
    v = noise[:, :c] if noise.shape[1] >= c else noise[:, :1].expand(-1, c, -1, -1)
    return torch.nn.functional.interpolate(v, size=tuple(shape[-2:]), mode="nearest").clamp(-1, 1)


def run_prompt2prompt(args: argparse.Namespace, pipe: Pipeline, device: torch.device) -> int:
    """Edit --prompt into --target (a sample of --seed, or the null-text inversion of
    --input) and write the strip: [input,] source, edit."""
    if not pipe.is_text:
        raise ValueError("prompt2prompt needs a text-conditional model (trained with prompts, "
                         "e.g. --dataset shapes); this checkpoint is not")
    inversion, shown, labels = None, [], ["source", "edit"]
    if args.input is not None:
        x = _image(args.input, pipe, device)
        inversion = editing.invert_image(pipe, x, args.prompt, guidance=args.guidance,
                                         steps=args.steps, iters=args.null_iters)
        shown, labels = [x], ["input", "reconstruction", "edit"]
    out = editing.prompt_to_prompt(
        pipe, args.prompt, args.target, guidance=args.guidance, steps=args.steps,
        seed=args.seed, sampler=args.sampler, sampler_options=_options(args),
        cross_steps=args.cross_steps, self_steps=args.self_steps,
        reweight=parse_reweight(args.reweight), mode=args.mode, inversion=inversion)
    if inversion is not None:
        report_null_text(args, pipe, shown[0], out[:1])
    grid = torch.cat([*shown, out]).float().cpu()
    caption = (f"prompt2prompt: {args.prompt!r} -> {args.target!r}, cross {args.cross_steps:g}"
               f", self {args.self_steps:g}, guidance {args.guidance:g}, {args.sampler} "
               f"{args.steps} steps" + ("" if inversion else f", seed {args.seed}")
               + "".join(f", {r}" for r in args.reweight))
    path = save_labelled_grid(grid, args.out, nrow=len(grid), scale=max(1, 64 // grid.shape[-1]),
                              col_labels=labels, caption=caption)
    print(f"wrote prompt2prompt result (source and edit) to {path}")
    return 0


def report_null_text(args: argparse.Namespace, pipe: Pipeline, x: torch.Tensor,
                     rec: torch.Tensor) -> None:
    """Print the reconstruction error of null-text inversion and of plain DDIM inversion
    with the same guidance (invert and reconstruct at gamma = --guidance)."""
    den = pipe.denoiser(guidance=args.guidance)
    cond = pipe.encode_prompts([args.prompt])
    ts = time_grid(den.process, args.steps)
    noise = editing.ode_invert(den, pipe.encode(x), ts, "ddim", cond=cond)
    plain = pipe.decode(editing.reconstruct(den, noise, ts, "ddim", cond=cond))
    rmse = [float((r.to(x) - x).pow(2).mean().sqrt()) for r in (rec, plain)]
    print(f"null-text inversion ({args.steps} steps, guidance {args.guidance:g}): "
          f"reconstruction RMSE {rmse[0]:.5f}; plain DDIM inversion: {rmse[1]:.5f}")
