"""The ``difflab`` command: train, train-classifier, distill, finetune, sample, fit-grid,
ems-stats, moments, edit, eval, nll, plot, export, serve."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..data import DataError
from ..io import WriteError
from ..training import NonFiniteLossError
from .distill import add_distill_parser
from .edit import add_edit_parser
from .ems_stats import add_ems_stats_parser
from .evaluate import add_eval_parsers
from .export import add_export_parser
from .finetune import add_finetune_parser
from .fit_grid import add_fit_grid_parser
from .moments import add_moments_parser
from .plot import add_plot_parser
from .sample import add_sample_parser
from .serve import add_serve_parser
from .train import add_train_classifier_parser, add_train_parser
from .train_autoencoder import add_train_autoencoder_parser
from .train_controlnet import add_train_controlnet_parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="difflab",
        description="Diffusion models end to end: train, sample, edit and evaluate. "
                    "Run 'difflab COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_parser(sub)
    add_train_classifier_parser(sub)
    add_train_autoencoder_parser(sub)
    add_train_controlnet_parser(sub)
    add_distill_parser(sub)
    add_finetune_parser(sub)
    add_sample_parser(sub)
    add_fit_grid_parser(sub)
    add_ems_stats_parser(sub)
    add_moments_parser(sub)
    add_edit_parser(sub)
    add_eval_parsers(sub)
    add_plot_parser(sub)
    add_export_parser(sub)
    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, FileNotFoundError, ValueError, WriteError, NonFiniteLossError) as e:
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
