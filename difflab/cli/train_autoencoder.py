"""``difflab train-autoencoder``: the first stage of latent diffusion (options generated from
:class:`difflab.recipes.autoencoder.AutoencoderTrainConfig`; a config file; resume)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..recipes.autoencoder import AutoencoderRecipe, AutoencoderTrainConfig
from ..recipes.config import WARMUP_FRACTION
from .options import add_config_options
from .run_options import add_run_options, resolve_run_config, train_recipe
from .train import config_line

#: test images over which the final held-out PSNR is measured
FINAL_PSNR_IMAGES = 1000


def add_train_autoencoder_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-autoencoder", help="train an autoencoder for latent diffusion",
                       description="Train a KL- or VQ-regularised convolutional autoencoder "
                                   "(L1/L2 reconstruction, optional patch discriminator), the "
                                   "first stage of latent diffusion. Writes reconstruction "
                                   "grids and PSNR; checkpoints hold the latent scale factor. "
                                   "Precedence: defaults < --config file < command line.")
    add_run_options(p)
    add_config_options(p, AutoencoderTrainConfig, aliases={"run.out_dir": ["--out"]})
    p.set_defaults(func=run_train_autoencoder)


def resolve_autoencoder_config(args: argparse.Namespace
                               ) -> tuple[AutoencoderTrainConfig, Path | None]:
    """Defaults < config file < (when resuming) the checkpoint's config < command line; a
    resumed run may change only the fields marked ``resume``."""
    return resolve_run_config(args, AutoencoderTrainConfig, "train-autoencoder",
                              lambda meta: "autoencoder" in meta, fresh=_capped_warmup)


def _capped_warmup(values: dict, where: str) -> AutoencoderTrainConfig:
    """A fresh run's config; no --warmup-steps given: at most a fifth of the steps (as
    ``difflab train``)."""
    optim = values.setdefault("optim", {})
    steps = optim.get("steps", AutoencoderTrainConfig().optim.steps)
    default = AutoencoderTrainConfig().optim.warmup_steps
    if ("warmup_steps" not in optim and isinstance(steps, int)
            and default > steps // WARMUP_FRACTION):
        optim["warmup_steps"] = steps // WARMUP_FRACTION
    return AutoencoderTrainConfig.from_dict(values, where)


def run_train_autoencoder(args: argparse.Namespace) -> int:
    """Train; then print the run's files and the held-out PSNR (rank 0 under torchrun)."""
    config, ckpt = resolve_autoencoder_config(args)
    recipe, result, main = train_recipe(
        lambda: AutoencoderRecipe(config, overwrite=args.overwrite), ckpt,
        lambda: config_line(config, AutoencoderTrainConfig, config.run.out_dir),
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
