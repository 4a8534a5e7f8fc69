"""``difflab edit sdedit|inpaint|invert|interpolate|vary``: editing images with a checkpoint."""

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
}


def add_edit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="edit images: sdedit, inpaint, invert, interpolate, vary",
                       description="Edit images with a trained model. " + "; ".join(
                           f"{k}: {v}" for k, v in KINDS.items()) + ".",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("kind", choices=list(KINDS), help="which edit")
    p.add_argument("--checkpoint", required=True, help="run folder or step_*.json")
    p.add_argument("--input", required=True, help="input image (any size: resized, cropped)")
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
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_edit)


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
    if args.kind in ("sdedit", "vary"):
        return sampler_options_from_args(args, ("eta",))
    if args.sampler_opt:
        raise ValueError(f"--sampler-opt applies to sdedit and vary, not {args.kind}")
    return {}


def check_edit_args(args: argparse.Namespace) -> None:
    """What can be refused before the model is loaded: missing inputs, counts, outputs."""
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
