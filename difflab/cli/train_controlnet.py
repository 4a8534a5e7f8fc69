"""``difflab train-controlnet --base RUN --control edges|mask``: a ControlNet (Zhang et al.
2023) on a frozen base model; options generated from
:class:`~difflab.recipes.controlnet.ControlNetTrainConfig`; a config file; resume."""

from __future__ import annotations

import argparse
import textwrap

from ..recipes.controlnet import ControlNetRecipe, ControlNetTrainConfig
from ..training import check_log
from .options import add_config_options
from .run_options import add_run_options, resolve_run_config, train_recipe
from .train import config_line

DESCRIPTION = (
    "Train a ControlNet: a copy of the base U-Net's encoder, fed control images computed from "
    "the data (--control), joined to the frozen base by zero convolutions. The base (--base: "
    "a run folder, checkpoint or pipeline folder) must be a pixel-space U-Net model; it keeps "
    "its process, prediction type and objective. The run folder samples with 'difflab sample "
    "--checkpoint OUT --control IMAGE.png'. Precedence: defaults < --config file < command "
    "line; --resume continues the latest checkpoint in --out-dir.")

EPILOG = """examples:
  difflab train-controlnet --base runs/shapes --control mask --out-dir runs/shapes-mask
  difflab train-controlnet --base runs/shapes --control mask --out-dir runs/shapes-mask \\
      --resume --steps 2000
then: difflab sample --checkpoint runs/shapes-mask --control mask.png --prompt "a red circle" """


def add_train_controlnet_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-controlnet", help="train a ControlNet on a trained model",
                       description=textwrap.fill(DESCRIPTION, 88), epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    add_config_options(p, ControlNetTrainConfig, aliases={"run.out_dir": ["--out"]},
                       default_text={"base": "required",
                                     "data": "the data set the base was trained on",
                                     "p_uncond": "the base's training rate"})
    p.set_defaults(func=run_train_controlnet)


def run_train_controlnet(args: argparse.Namespace) -> int:
    """Train; then print the run's files and how to sample it (rank 0 under torchrun)."""
    config, ckpt = resolve_run_config(args, ControlNetTrainConfig, "train-controlnet",
                                      lambda meta: "control" in meta)
    check_log(config.run.log)  # a missing optional package: one line, before anything else
    recipe, result, main = train_recipe(
        lambda: ControlNetRecipe(config, overwrite=args.overwrite), ckpt,
        lambda: config_line(config, ControlNetTrainConfig, config.run.out_dir),
        progress=not args.no_progress)
    if not main:
        return 0
    grid = recipe.sample_grid()
    print(f"controlnet run: {recipe.out_dir}\n  config:      {recipe.out_dir / 'config.json'}\n"
          f"  metrics:     {result['metrics']}\n  checkpoint:  {result['checkpoint']}\n"
          f"  sample grid: {grid} (control images, then samples)\n"
          f"sample with: difflab sample --checkpoint {recipe.out_dir} --control IMAGE.png")
    return 0
