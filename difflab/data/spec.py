"""The argument of a data set that lives at a local path: ``PATH[:KEY=VALUE ...][:SPLIT]``.

``hf:PATH`` and ``cifar10:PATH`` take options after the path, each ``:KEY=VALUE`` (e.g.
``hf:data/pets:image=photo:text=caption``), and may end in ``:train``, ``:test`` or ``:all``,
the split suffix that ``difflab eval`` / ``difflab nll`` already read (``digits:test``), so the
same name works for ``difflab train`` too. A path that exists as given is never split up, so a
path holding ":" still works when it has no options.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from .base import SPLITS, DataError


@dataclass(frozen=True)
class PathSpec:
    """A parsed ``PATH[:KEY=VALUE ...][:SPLIT]``; ``split`` is None without a suffix."""

    path: Path
    options: dict[str, str] = field(default_factory=dict)
    split: str | None = None


def parse_path_spec(kind: str, arg: str, keys: Collection[str]) -> PathSpec:
    """Split ``arg`` (the text after ``KIND:``) into path, options and split suffix.

    Raises:
        DataError: no path, an option not in ``keys``, or an option given twice.
    """
    if arg and Path(arg).expanduser().exists():
        return PathSpec(Path(arg).expanduser())
    parts = arg.split(":")
    split = None
    if len(parts) > 1 and parts[-1] in SPLITS:
        split = parts.pop()
    options: dict[str, str] = {}
    while len(parts) > 1 and "=" in parts[-1]:
        key, _, value = parts.pop().partition("=")
        if key not in keys:
            raise DataError(f"unknown option {key!r} in {kind}:{arg}; options: "
                            f"{', '.join(sorted(keys))} (as :KEY=VALUE after the path)")
        if key in options:
            raise DataError(f"option {key!r} given twice in {kind}:{arg}")
        options[key] = value
    path = ":".join(parts)
    if not path:
        raise DataError(f"no path in dataset name {kind}:{arg} (expected {kind}:PATH)")
    return PathSpec(Path(path).expanduser(), options, split)


def effective_split(name: str, suffix: str | None, requested: str) -> str:
    """The split to load: the name's suffix, else the requested one (they must agree when the
    request is not "all")."""
    if suffix is None or requested == suffix:
        return requested
    if requested == "all":
        return suffix
    raise DataError(f"dataset {name!r} names split {suffix!r} but split {requested!r} was "
                    f"asked for; drop the :{suffix} suffix")
