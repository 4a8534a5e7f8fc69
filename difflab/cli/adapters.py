"""``--adapter PATH[:SCALE]`` of ``difflab sample`` and ``difflab edit``: adapters (LoRA and
the other adapter stages) put on the loaded model, each with an optional strength."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..pipeline import Pipeline

AdapterSpec = tuple[Path, float | None]


def add_adapter_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", action="append", default=None, metavar="PATH[:SCALE]",
                   help="apply the adapter saved at PATH (an adapter folder, e.g. written by "
                        "Pipeline.save_adapters, or a fine-tuning run / checkpoint) with "
                        "strength SCALE (default: the adapter's own); repeat to combine "
                        "several")


def parse_adapter(spec: str) -> AdapterSpec:
    """``"PATH[:SCALE]"`` -> (path, scale or None); a path that does not exist or a scale
    that is not a finite number is an error naming the option (before any model loads)."""
    path, sep, tail = spec.rpartition(":")
    scale = None
    if sep and not Path(spec).exists():
        try:
            scale = float(tail)
        except ValueError:
            raise ValueError(f"--adapter {spec!r}: the scale {tail!r} is not a number "
                             "(PATH[:SCALE])") from None
        if not math.isfinite(scale):
            raise ValueError(f"--adapter {spec!r}: the scale must be a finite number")
    else:
        path = spec
    if not Path(path).exists():
        raise FileNotFoundError(f"--adapter: no adapter at {path}")
    return Path(path), scale


def parse_adapters(specs: list[str] | None) -> list[AdapterSpec]:
    """Every ``--adapter`` given, parsed and checked (see :func:`parse_adapter`)."""
    return [parse_adapter(s) for s in specs or []]


def add_adapters(pipe: Pipeline, adapters: list[AdapterSpec], ema: bool | None = None) -> None:
    """Apply the parsed ``--adapter`` options to ``pipe``, in order (their updates add)."""
    for path, scale in adapters:
        try:
            pipe.load_adapter(path, scale, ema=ema)
        except ValueError as e:
            raise ValueError(f"--adapter {path}: {e}") from None
