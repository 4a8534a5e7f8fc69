"""``difflab finetune``: adapt a trained model to new images -- all weights, LoRA adapters or a
new token's embedding (textual inversion), optionally with DreamBooth's prior preservation
(options generated from :class:`difflab.recipes.finetune_config.FinetuneConfig`)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from ..recipes.finetune import FinetuneRecipe
from ..recipes.finetune_config import FinetuneConfig
from .options import add_config_options
from .run_options import add_run_options, resolve_run_config, train_recipe
from .train import config_line

EPILOG = """examples:
  difflab finetune --base runs/shapes --data folder:my_shapes --out runs/ft
  difflab finetune --lora --lora-rank 4 --base runs/shapes --data folder:my_shapes --out runs/ft
  difflab finetune --lora --base runs/shapes --data folder:five_images \\
      --instance-prompt "a sks shape" --class-prompt "a shape" --class-images 50 --out runs/db
  difflab finetune --textual-inversion "<my-shape>" --init-word shape \\
      --instance-prompt "a <my-shape>" --base runs/shapes --data folder:five_images --out runs/ti
then: difflab sample --checkpoint runs/ti --prompt "a large <my-shape>" """

DESCRIPTION = (
    "Fine-tune a trained model (--base: a run or pipeline folder) on new images with its own "
    "process, prediction and objective. Full fine-tuning trains every weight; --lora trains "
    "low-rank adapters only (Hu et al. 2021); --textual-inversion TOKEN --init-word WORD "
    "learns only a new token's embedding (Gal et al. 2022). --instance-prompt binds the "
    "images to a prompt (or, for class models, a class); --class-prompt adds DreamBooth's "
    "prior-preservation loss on class images the base generates once (Ruiz et al. 2023). The "
    "run folder loads with 'difflab sample --checkpoint OUT' (adapter runs name their base "
    "model). Precedence: defaults < --config file < command line.")


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a trained model: full, LoRA, DreamBooth, textual inversion",
        description=textwrap.fill(DESCRIPTION, 88),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    add_config_options(p, FinetuneConfig, aliases={"run.out_dir": ["--out"]},
                       default_text={"model.base": "required", "model.data": "required",
                                     "optim.lr": "1e-4; 1e-3 with --lora; 5e-3 with "
                                                 "--textual-inversion"})
    p.set_defaults(func=run_finetune)


def resolve_finetune_config(args: argparse.Namespace) -> tuple[FinetuneConfig, Path | None]:
    """Defaults < config file < (when resuming) the checkpoint's config < command line; a
    resumed run may change only the fields marked ``resume``."""
    return resolve_run_config(args, FinetuneConfig, "finetune", lambda meta: "finetune" in meta,
                              fresh=_fresh_config)


def _fresh_config(values: dict, where: str) -> FinetuneConfig:
    """A fresh run's config: the method's learning rate unless given; --base and --data."""
    config = FinetuneConfig.from_values(values, where)
    config.check_given()
    return config


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune; then print the run's files and how to sample it."""
    config, ckpt = resolve_finetune_config(args)
    recipe, result, main = train_recipe(
        lambda: FinetuneRecipe(config, overwrite=args.overwrite), ckpt,
        lambda: f"{recipe_method(config)} fine-tuning of {config.model.base}\n"
                + config_line(config, FinetuneConfig, config.run.out_dir),
        progress=not args.no_progress)
    if not main:
        return 0
    out = Path(config.run.out_dir)
    print(f"trained parameters: {recipe.trained_parameters}\nrun folder:  {out}\n"
          f"  metrics:     {result['metrics']}\n  checkpoint:  {result['checkpoint']}\n"
          f"sample with: difflab sample --checkpoint {out}")
    return 0


def recipe_method(config: FinetuneConfig) -> str:
    """The method's name for people."""
    return {"full": "full", "lora": "LoRA", "textual_inversion": "textual-inversion"}[
        config.method.name]
