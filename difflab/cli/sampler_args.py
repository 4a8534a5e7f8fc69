"""``--sampler-opt KEY=VALUE`` and the shortcut flags (--eta, --order, ...) of the commands that
run a sampler: one dict of options, validated against what the chosen sampler declares."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..samplers import check_sampler_options, parse_sampler_options


def add_sampler_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the chosen sampler, repeatable, e.g. --sampler-opt "
                        "order=3 (docs/samplers.md lists each sampler's options); one it "
                        "does not take is an error")


def sampler_options_from_args(args: argparse.Namespace, shortcuts: Sequence[str] = ()
                              ) -> dict[str, Any]:
    """``--sampler-opt`` items plus each shortcut flag the user gave (flags left at None are
    not options), checked for ``args.sampler``: a ValueError names the sampler and the
    options it takes."""
    options = parse_sampler_options(args.sampler, args.sampler_opt)
    for name in shortcuts:
        value = getattr(args, name)
        if value is None:
            continue
        if name in options:
            raise ValueError(f"sampler option {name!r} given twice (--{name} and "
                             f"--sampler-opt {name}=...)")
        options[name] = value
    return check_sampler_options(args.sampler, options)
