"""``difflab train-controlnet --base RUN --control edges|mask``: a ControlNet (Zhang et al.
2023) on a frozen base model; options generated from
:class:`~difflab.recipes.controlnet.ControlNetTrainConfig`."""

from __future__ import annotations

import argparse

from ..config import from_dict
from ..recipes.controlnet import ControlNetRecipe, ControlNetTrainConfig
from ..training import check_log
from .options import add_config_options, changed_options, given_options


def add_train_controlnet_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-controlnet", help="train a ControlNet on a trained model",
                       description="Train a ControlNet: a copy of the base U-Net's encoder, fed "
                                   "control images computed from the data (--control), joined "
                                   "to the frozen base by zero convolutions. The run folder "
                                   "samples with 'difflab sample --checkpoint RUN --control "
                                   "IMAGE.png'.")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --out-dir holds another run (deleting its files)")
    add_config_options(p, ControlNetTrainConfig)
    p.set_defaults(func=run_train_controlnet)


def run_train_controlnet(args: argparse.Namespace) -> int:
    config = from_dict(ControlNetTrainConfig, given_options(args, ControlNetTrainConfig),
                       where="command line")
    check_log(config.run.log)
    recipe = ControlNetRecipe(config, overwrite=args.overwrite)  # errors before any output
    changed = " ".join(changed_options(config, ControlNetTrainConfig))
    print(f"config: {changed} (full config: {config.run.out_dir}/config.json)", flush=True)
    result = recipe.run(progress=not args.no_progress)
    if not recipe.dist.is_main:
        return 0
    grid = recipe.sample_grid()
    print(f"controlnet run: {recipe.out_dir}\n  checkpoint:  {result['checkpoint']}\n"
          f"  sample grid: {grid} (control images, then samples)\n"
          f"  sample with: difflab sample --checkpoint {recipe.out_dir} --control IMAGE.png")
    return 0
