"""Command-line options generated from typed config dataclasses (``difflab.config``).

Every leaf field of a (nested) config becomes one ``--field-name`` option, typed from its
annotation, with the field's help text, range and default, ``Literal`` choices, and one
argument group per nested config. A value outside the field's range is refused by argparse
naming the option (``argument --steps: must be >= 1, got 0``), exit status 2. Options the
user does not give stay absent from the namespace, so precedence (defaults < config file <
command line) is decided by the caller. A boolean is ``--flag`` / ``--no-flag`` (``--flag
false`` still works), and the help shows both forms.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from ..config import Leaf, check_range, leaves, range_text, type_name, unflatten

__all__ = ["BoolOption", "add_config_options", "changed_options", "given_options",
           "parse_bool"]


def parse_bool(s: str) -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` -> bool."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


class BoolOption(argparse.Action):
    """``--flag`` (true), ``--no-flag`` (false), or ``--flag VALUE`` for any
    :func:`parse_bool` value; like ``argparse.BooleanOptionalAction`` but keeping the older
    ``--flag false`` form."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        negative = ["--no-" + s[2:] for s in option_strings if s.startswith("--")]
        kwargs |= {"nargs": "?", "const": None, "type": parse_bool}
        super().__init__([*option_strings, *negative], dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if option_string is not None and option_string.startswith("--no-"):
            if values is not None:
                raise argparse.ArgumentError(self, "takes no value")
            values = False
        setattr(namespace, self.dest, True if values is None else values)


class _BoolHelp:
    """Help formatter mix-in: a :class:`BoolOption` shows as ``--flag, --no-flag`` in the
    option list and ``[--flag | --no-flag]`` in the usage line."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolOption):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)  # type: ignore[misc]

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if isinstance(action, BoolOption):  # the usage line: "--flag" + " " + this
            return "| " + action.option_strings[-1]
        return super()._format_args(action, default_metavar)  # type: ignore[misc]


def _with_bool_help(parser: argparse.ArgumentParser) -> None:
    if not issubclass(parser.formatter_class, _BoolHelp):
        parser.formatter_class = type("BoolHelpFormatter", (_BoolHelp, parser.formatter_class),
                                      {})


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
                       aliases: dict[str, list[str]] | None = None,
                       default_text: dict[str, str] | None = None) -> None:
    """Add one option per command-line leaf of ``cls`` (grouped by nested config).

    The option's ``dest`` is the leaf's dotted path; read the given ones back with
    :func:`given_options`. ``aliases`` maps a dotted path to extra flags (e.g. ``--out``);
    ``default_text`` a dotted path to the default shown in the help, where the value is
    derived rather than the field's default."""
    aliases, default_text = aliases or {}, default_text or {}
    defaults = cls()
    _with_bool_help(parser)
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
            "help": f"{leaf.help} ({bounds + '; ' if bounds else ''}default: "
                    f"{default_text.get(leaf.path) or _default_text(leaf, defaults)})"}
        if tp is bool:  # --flag / --no-flag; "--compile false" still works
            kwargs = {k: v for k, v in kwargs.items() if k not in ("nargs", "type")}
            kwargs["action"] = BoolOption
        if choices is not None:
            kwargs["choices"] = choices
        if choices is None and tp is not bool:
            kwargs["metavar"] = leaf.name.upper()
        groups[group_name].add_argument(_flag(leaf), *aliases.get(leaf.path, []), **kwargs)


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The config options present on the command line, as a nested dict for ``cls``."""
    paths = {leaf.path for leaf in leaves(cls)}
    flat = {k: v for k, v in vars(args).items() if k in paths}
    return unflatten(cls, flat, where="command line")


def changed_options(config: Any, cls: type) -> list[str]:
    """The command-line options that make ``cls()`` into ``config``: one ``--flag value``
    (``--flag`` / ``--no-flag`` for booleans) per command-line leaf that differs, in field
    order; fields off the command line (derived ones) are left out."""
    out: list[str] = []
    defaults = cls()
    for leaf in leaves(cls):
        if not leaf.field.metadata.get("cli", True):
            continue
        old, new = defaults, config
        for p in leaf.path.split("."):
            old, new = getattr(old, p), getattr(new, p)
        if old == new:
            continue
        flag = _flag(leaf)
        if isinstance(new, bool):
            out.append(flag if new else "--no-" + flag[2:])
        elif isinstance(new, (list, tuple)):
            out.append(" ".join([flag, *map(str, new)]))
        else:
            out.append(f"{flag} {new}")
    return out
