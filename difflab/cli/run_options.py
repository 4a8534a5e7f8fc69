"""What every training command shares: the run options (``--config``, ``--resume``,
``--no-progress``, ``--overwrite``) and how a resumed run's config is merged.

Precedence: defaults < ``--config`` file < (when resuming) the checkpoint's saved config <
command line; a resumed run may change only the fields marked ``resume=True``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..config import changed_fields, deep_merge, from_dict, leaves, to_dict, unflatten
from ..recipes.config import read_config_file
from ..training import resolve_checkpoint
from ..training.checkpoint import load_checkpoint
from ..training.distributed import env_info, process_group
from .options import given_options

__all__ = ["CONFIG_HELP", "add_run_options", "resolve_run_config", "resumed_config",
           "train_recipe"]

C = TypeVar("C")
R = TypeVar("R")

OVERWRITE_HELP = ("start afresh even if --out-dir holds another run: delete its config.json, "
                  "metrics.jsonl, checkpoints and sample grids (without it, such a folder is "
                  "refused unless --resume continues that run)")


#: ``--config``'s help for a command whose config has only nested groups
CONFIG_HELP = ("JSON or TOML file: nested tables as in a run's config.json, or dotted keys "
               "(optim.lr)")


def add_run_options(p: argparse.ArgumentParser, config_help: str = CONFIG_HELP) -> None:
    """``--config`` (described by ``config_help``), ``--resume``, ``--no-progress`` and
    ``--overwrite``."""
    p.add_argument("--config", help=config_help)
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint path, or from the latest one in --out-dir")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def resolve_run_config(args: argparse.Namespace, cls: type[C], command: str,
                       is_own: Callable[[dict[str, Any]], bool],
                       fresh: Callable[[dict[str, Any], str], C] | None = None
                       ) -> tuple[C, Path | None]:
    """The run config of ``difflab command`` from ``args`` (its run options and those
    :func:`~difflab.cli.options.add_config_options` made of ``cls``), and the checkpoint to
    resume from (None for a fresh run).

    Defaults < ``--config`` file (flat, dotted or nested keys) < (when resuming) the
    checkpoint's saved config < command line; a resumed run may change only the fields
    marked ``resume`` and must resume a checkpoint of this command (``is_own(meta)``, see
    :func:`resumed_config`). ``fresh(values, where)`` builds a fresh run's config (default:
    :func:`~difflab.config.from_dict`), e.g. to derive defaults from other values."""
    def parse(d: Mapping[str, Any], where: str) -> C:
        return from_dict(cls, d, where)

    values: dict[str, Any] = {}
    if args.config:
        values = unflatten(cls, read_config_file(args.config), where=str(args.config))
        parse(values, str(args.config))  # errors name the file
    deep_merge(values, given_options(args, cls))
    if not args.resume:
        return (fresh or parse)(values, "command line"), None
    out_dir = parse(values, "command line").run.out_dir  # type: ignore[attr-defined]
    return resumed_config(cls, values, args.resume, out_dir, parse, command, is_own)


def resumed_config(cls: type[C], values: Mapping[str, Any], resume: str, out_dir: str | Path,
                   parse: Callable[[Any, str], C], command: str,
                   is_own: Callable[[dict[str, Any]], bool] = lambda meta: True
                   ) -> tuple[C, Path]:
    """The config of a run resumed from ``resume`` (a checkpoint path, or ``"latest"`` in
    ``out_dir``): the checkpoint's saved config with ``values`` (the file's and command
    line's) over it, read by ``parse(dict, where)``. A checkpoint of another command
    (``is_own(meta)`` false) or a changed field not marked ``resume`` is a ValueError."""
    ckpt = resolve_checkpoint(out_dir if resume == "latest" else resume)
    _, meta = load_checkpoint(ckpt)
    if not isinstance(meta.get("config"), dict) or not is_own(meta):
        raise ValueError(f"{ckpt} holds no run config of 'difflab {command}' (not one of its "
                         "checkpoints)")
    saved = parse(meta["config"], str(ckpt))
    merged = to_dict(saved)
    deep_merge(merged, dict(values))
    config = parse(merged, "command line")
    clash = sorted(leaf.name for leaf in changed_fields(saved, config) if not leaf.resume)
    if clash:
        free = sorted(leaf.name for leaf in leaves(cls) if leaf.resume)
        raise ValueError(f"cannot change {clash} when resuming from {ckpt}; only {free} may "
                         f"change")
    return config, ckpt


def train_recipe(build: Callable[[], R], ckpt: Path | None, summary: Callable[[], str],
                 progress: bool) -> tuple[R, dict[str, Any], bool]:
    """Build the recipe (data loaded, run folder claimed) and only then print ``summary()``
    (so an error is the only line), resume from ``ckpt`` if given, and train; under torchrun
    as one rank of the job, whose process group is released however it ends. Returns (the
    recipe, the run's result, whether this is the rank that prints and writes)."""
    main = env_info().is_main
    recipe: Any = None

    def release() -> None:
        if recipe is not None:
            recipe.release_distributed()

    with process_group(release):
        recipe = build()
        if main:
            print(summary(), flush=True)
        if ckpt is not None:
            recipe.resume(ckpt)
            if main:
                print(f"resumed from {ckpt} at step {recipe.step}")
        result = recipe.run(progress=progress)
    return recipe, result, main
