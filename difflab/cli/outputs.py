"""Output files of the commands: an existing file is replaced only with ``--overwrite``.

The check runs before any work, so a long sampling or fitting run is not spent on a result
that cannot be written; the files themselves are still written atomically (``io.atomic_write``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io import check_new_file


def add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist (without it, an existing "
                        "output file is an error and nothing is written)")


def output_beside_run(args: argparse.Namespace, name: str) -> Path:
    """``--out``, or ``name`` in the run folder (beside a checkpoint file given instead)."""
    if args.out:
        return Path(args.out)
    ckpt = Path(args.checkpoint)
    return (ckpt if ckpt.is_dir() else ckpt.parent) / name


def check_outputs(args: argparse.Namespace, **flags: str | Path | None) -> None:
    """Refuse each given output (``flag name -> path``; None: not asked for) that exists,
    unless ``--overwrite``: a ValueError naming the option and the file."""
    for flag, path in flags.items():
        if path is not None:
            check_new_file(path, args.overwrite, f"--{flag.replace('_', '-')}")
