"""``difflab train`` and ``difflab train-classifier``: options generated from the recipes'
typed configs, a config file, resume; then the recipe runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import deep_merge, from_dict
from ..recipes import ClassifierTrainConfig, DiffusionRecipe, TrainConfig, train_classifier
from ..recipes.config import DERIVED_DEFAULTS, nested_values, read_config_file, resolve_values
from ..recipes.ddgan import DDGANRecipe
from ..training import check_log
from .options import add_config_options, changed_options, given_options
from .run_options import add_run_options, resumed_config, train_recipe


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a diffusion model",
                       description="Train a diffusion model. With no options: a class-"
                                   "conditional U-Net on the built-in digits. Precedence: "
                                   "defaults < --config file < command-line options.")
    add_run_options(p, "JSON or TOML file: nested tables as in a run's config.json, dotted "
                       "keys (optim.lr) or flat keys (lr)")
    add_config_options(p, TrainConfig, aliases={"run.out_dir": ["--out"]},
                       default_text=DERIVED_DEFAULTS)
    p.set_defaults(func=run_train)


def add_train_classifier_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-classifier", help="train a noisy classifier for guidance",
                       description="Train p(y | x_t, t) on noised labelled images, for "
                                   "classifier guidance (difflab sample --classifier).")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --out-dir holds another run (deleting its files)")
    add_config_options(p, ClassifierTrainConfig)
    p.set_defaults(func=run_train_classifier)


def run_train_classifier(args: argparse.Namespace) -> int:
    config = from_dict(ClassifierTrainConfig, given_options(args, ClassifierTrainConfig),
                       where="command line")
    check_log(config.log)  # a missing optional package: one line, before anything else
    print(config_line(config, ClassifierTrainConfig, config.out_dir), flush=True)
    result = train_classifier(config, progress=not args.no_progress,
                              overwrite=args.overwrite)
    print(f"classifier checkpoint: {result['checkpoint']}\n"
          f"accuracy on noised training images: {result['accuracy']}")
    return 0


def resolve_config(args: argparse.Namespace, notes: list[str] | None = None
                   ) -> tuple[TrainConfig, Path | None]:
    """Merge defaults, config file, checkpoint (when resuming) and command-line options;
    ``notes`` collects the values derived from the data (``resolve_values``).

    A resumed run keeps its saved config; only fields marked ``resume`` may change."""
    values = {}
    if args.config:
        values = nested_values(read_config_file(args.config), where=str(args.config))
        TrainConfig.from_values(values, where=str(args.config))  # errors name the file
    deep_merge(values, given_options(args, TrainConfig))
    if not args.resume:
        return TrainConfig.from_values(values, notes=notes), None
    out_dir = resolve_values(values)["run"]["out_dir"]  # the derived one when not given
    # flat (old) or nested saved configs
    return resumed_config(TrainConfig, values, args.resume, out_dir,
                          lambda d, where: TrainConfig.from_values(d, where=where), "train")


def config_line(config: object, cls: type, out_dir: str | Path) -> str:
    """One line of the options that make ``cls()`` into ``config``, and where the full
    config is (the run folder's ``config.json``)."""
    changed = " ".join(changed_options(config, cls)) or "all defaults"
    return f"config: {changed} (full config: {Path(out_dir) / 'config.json'})"


def config_summary(config: TrainConfig, notes: list[str]) -> str:
    """What a run prints before training: the derived values, then :func:`config_line`."""
    lines = [f"note: {n}" if not n.startswith("warning:") else n for n in notes]
    lines.append(config_line(config, TrainConfig, config.run.out_dir))
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    """Train (under torchrun: as one rank of a DDP job; rank 0 prints and writes).

    The config is checked and the recipe built (data loaded, run folder claimed) before
    anything is printed, so an error is the only line."""
    notes: list[str] = []
    config, ckpt = resolve_config(args, notes)
    # an objective with a recipe of its own (objectives.RECIPE_OBJECTIVES) trains there
    kind = DDGANRecipe if config.objective.name == "ddgan" else DiffusionRecipe
    recipe, result, main = train_recipe(lambda: kind(config, overwrite=args.overwrite), ckpt,
                                        lambda: config_summary(config, notes),
                                        progress=not args.no_progress)
    if not main:
        return 0
    grid = recipe.sample_grid()
    out = Path(config.run.out_dir)
    print(f"run folder:  {out}\n  config:      {out / 'config.json'}\n"
          f"  metrics:     {result['metrics']}\n  checkpoint:  {result['checkpoint']}\n"
          f"  sample grid: {grid}")
    return 0
