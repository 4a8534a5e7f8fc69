"""Command-line options generated from typed config dataclasses (``difflab.config``).

Every leaf field of a (nested) config becomes one ``--field-name`` option, typed from its
annotation, with the field's help text, range and default, ``Literal`` choices, and one
argument group per nested config. A value outside the field's range is refused by argparse
naming the option (``argument --steps: must be >= 1, got 0``), exit status 2. Options the
user does not give stay absent from the namespace, so precedence (defaults < config file <
command line) is decided by the caller.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from ..config import Leaf, check_range, leaves, range_text, type_name, unflatten

__all__ = ["add_config_options", "given_options", "parse_bool"]


def parse_bool(s: str) -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` -> bool."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _scalar(tp: Any) -> tuple[Any, list[Any] | None, str | None]:
    """(argparse type, choices, nargs) of an annotation: ``X | None`` -> X, lists -> "*"."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0] if len(args) == 1 else tp
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        item, _, _ = _scalar(typing.get_args(tp)[0])
        return item, None, "*"
    if origin is Literal:
        choices = list(typing.get_args(tp))
        return type(choices[0]), choices, None
    if tp in (int, float, str, bool):
        return tp, None, None
    raise TypeError(f"no command-line form for {type_name(tp)}")


def _flag(leaf: Leaf) -> str:
    return leaf.field.metadata.get("flag") or "--" + leaf.name.replace("_", "-")


def _ranged(tp: Any, leaf: Leaf) -> Any:
    """``tp`` as an argparse type that also refuses values outside the leaf's range."""
    if not range_text(leaf.field):
        return tp

    def convert(text: str) -> Any:
        value = tp(text)  # a ValueError here: argparse's "invalid int value"
        problem = check_range(value, leaf.field)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value
    convert.__name__ = tp.__name__
    return convert


def _default_text(leaf: Leaf, defaults: Any) -> str:
    value: Any = defaults
    for p in leaf.path.split("."):
        value = getattr(value, p)
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return str(value)


def add_config_options(parser: argparse.ArgumentParser, cls: type,
                       aliases: dict[str, list[str]] | None = None) -> None:
    """Add one option per command-line leaf of ``cls`` (grouped by nested config).

    The option's ``dest`` is the leaf's dotted path; read the given ones back with
    :func:`given_options`. ``aliases`` maps a dotted path to extra flags (e.g. ``--out``)."""
    aliases = aliases or {}
    defaults = cls()
    groups: dict[str, Any] = {}
    for leaf in leaves(cls):
        if not leaf.field.metadata.get("cli", True):
            continue
        group_name = leaf.path.rpartition(".")[0]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name) if group_name \
                else parser
        tp, choices, nargs = _scalar(leaf.type)
        dynamic = leaf.field.metadata.get("choices")
        if dynamic is not None:
            choices = list(dynamic() if callable(dynamic) else dynamic)
        bounds = range_text(leaf.field)
        kwargs: dict[str, Any] = {
            "default": argparse.SUPPRESS, "dest": leaf.path, "nargs": nargs,
            "type": parse_bool if tp is bool else _ranged(tp, leaf),
            "help": f"{leaf.help} ({bounds + '; ' if bounds else ''}"
                    f"default: {_default_text(leaf, defaults)})"}
        if tp is bool:  # "--compile" alone means true; "--compile false" still works
            kwargs |= {"nargs": "?", "const": True}
        if choices is not None:
            kwargs["choices"] = choices
        kwargs["metavar"] = leaf.name.upper() if choices is None or tp is bool else None
        if kwargs["metavar"] is None:
            del kwargs["metavar"]
        groups[group_name].add_argument(_flag(leaf), *aliases.get(leaf.path, []), **kwargs)


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The config options present on the command line, as a nested dict for ``cls``."""
    paths = {leaf.path for leaf in leaves(cls)}
    flat = {k: v for k, v in vars(args).items() if k in paths}
    return unflatten(cls, flat, where="command line")
