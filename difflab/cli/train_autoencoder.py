"""``difflab train-autoencoder``: the first stage of latent diffusion (options generated from
:class:`difflab.recipes.autoencoder.AutoencoderTrainConfig`; a config file; resume)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import deep_merge, unflatten
from ..recipes.autoencoder import AutoencoderRecipe, AutoencoderTrainConfig
from ..recipes.config import WARMUP_FRACTION, read_config_file
from .options import add_config_options, changed_options, given_options
from .run_options import add_run_options, resumed_config, train_recipe

#: test images over which the final held-out PSNR is measured
FINAL_PSNR_IMAGES = 1000


def add_train_autoencoder_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-autoencoder", help="train an autoencoder for latent diffusion",
                       description="Train a KL- or VQ-regularised convolutional autoencoder "
                                   "(L1/L2 reconstruction, optional patch discriminator), the "
                                   "first stage of latent diffusion. Writes reconstruction "
                                   "grids and PSNR; checkpoints hold the latent scale factor. "
                                   "Precedence: defaults < --config file < command line.")
    add_run_options(p, "JSON or TOML file: nested tables as in a run's config.json, or "
                       "dotted keys (optim.lr)")
    add_config_options(p, AutoencoderTrainConfig, aliases={"run.out_dir": ["--out"]})
    p.set_defaults(func=run_train_autoencoder)


def resolve_autoencoder_config(args: argparse.Namespace
                               ) -> tuple[AutoencoderTrainConfig, Path | None]:
    """Defaults < config file < (when resuming) the checkpoint's config < command line; a
    resumed run may change only the fields marked ``resume``."""
    cls = AutoencoderTrainConfig
    values: dict = {}
    if args.config:
        values = unflatten(cls, read_config_file(args.config), where=str(args.config))
        cls.from_dict(values, where=str(args.config))  # errors name the file
    deep_merge(values, given_options(args, cls))
    if not args.resume:
        _cap_warmup(values)
        return cls.from_dict(values, where="command line"), None
    out_dir = cls.from_dict(values, where="command line").run.out_dir
    return resumed_config(cls, values, args.resume, out_dir, cls.from_dict,
                          "train-autoencoder", lambda meta: "autoencoder" in meta)


def _cap_warmup(values: dict) -> None:
    """No --warmup-steps given: at most a fifth of the steps (as ``difflab train``)."""
    optim = values.setdefault("optim", {})
    if "warmup_steps" in optim:
        return
    steps = optim.get("steps", AutoencoderTrainConfig().optim.steps)
    default = AutoencoderTrainConfig().optim.warmup_steps
    if isinstance(steps, int) and default > steps // WARMUP_FRACTION:
        optim["warmup_steps"] = steps // WARMUP_FRACTION


def run_train_autoencoder(args: argparse.Namespace) -> int:
    """Train; then print the run's files and the held-out PSNR (rank 0 under torchrun)."""
    config, ckpt = resolve_autoencoder_config(args)
    recipe, result, main = train_recipe(
        lambda: AutoencoderRecipe(config, overwrite=args.overwrite), ckpt,
        lambda: "config: {} (full config: {})".format(
            " ".join(changed_options(config, AutoencoderTrainConfig)) or "all defaults",
            Path(config.run.out_dir) / "config.json"),
        progress=not args.no_progress)
    if not main:
        return 0
    grid = recipe.grid_path()
    if not grid.exists():  # the last step's grid unless the callback made it
        grid = recipe.reconstruction_grid()
    n = min(FINAL_PSNR_IMAGES, len(recipe.test_images))
    value = recipe.held_out_psnr(FINAL_PSNR_IMAGES)
    scale, shift = recipe.latent_scale()
    out = Path(config.run.out_dir)
    which = "held-out (test split)" if recipe.held_out else "training"
    print(f"run folder:  {out}\n  config:      {out / 'config.json'}\n"
          f"  metrics:     {result['metrics']}\n  checkpoint:  {result['checkpoint']}\n"
          f"  reconstructions: {grid}\n"
          f"  latent scale factor: {scale:.5g} (shift {shift:.4g})\n"
          f"{which} PSNR: {value:.2f} dB over {n} images")
    return 0
