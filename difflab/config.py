"""Typed configs: dataclasses whose fields carry their help text and a "may change on resume"
mark, with a JSON round trip that checks every value against its annotation.

A config is a (possibly nested) dataclass. Each field is declared with :func:`option`::

    @dataclass
    class OptimConfig:
        lr: float = option(2e-3, "AdamW learning rate", resume=False)
        schedule: Literal["constant", "cosine"] = option("constant", "learning-rate schedule")

Choices are ``typing.Literal``; lists, tuples, ``X | None``, nested dataclasses and the scalar
types are checked by :func:`from_dict`, which refuses an unknown key or a value of the wrong
type with an error naming the key (as a dotted path), the value and the expected type. A
number's range is declared with the field (``option(1500, "steps", ge=1)``; ``ge``/``gt``/
``le``/``lt`` as in >=, >, <=, <) and checked by :func:`from_dict` too, and by
:func:`check_ranges` in a config's ``__post_init__`` when it is built directly. The command
line options are generated from the same fields (``difflab.cli.options``, which also shows and
checks the ranges), so help text lives in one place.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, Field
from typing import Any, Literal, TypeVar, Union

__all__ = ["ConfigError", "Leaf", "changed_fields", "check_range", "check_ranges", "deep_merge",
           "from_dict", "leaves", "option", "range_text", "to_dict", "type_name", "unflatten"]

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value or key that does not fit its dataclass; the message names both."""


def option(default: Any = MISSING, help: str = "", *, resume: bool = False,
           factory: Any = None, cli: bool = True, flag: str | None = None,
           choices: Any = None, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with ``help`` text and a ``resume`` mark (True: the value may change
    when a run is resumed). ``factory`` gives a mutable default; ``cli=False`` keeps the field
    off the command line (derived values such as a network's input channels); ``flag``
    overrides the generated option name; ``choices`` (a list or a function returning one)
    restricts a ``str`` field to names from a registry that a ``Literal`` cannot list;
    ``ge``/``gt``/``le``/``lt`` bound a number (value >= ge, > gt, <= le, < lt; ``None``
    values of an optional field are not bounded)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
              if v is not None}
    metadata = {"help": help, "resume": resume, "cli": cli, "flag": flag, "choices": choices,
                "range": bounds}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def range_text(f: Field) -> str:
    """A field's declared range as text (``>= 0 and < 1``); empty when it has none."""
    bounds = f.metadata.get("range") or {}
    return " and ".join(f"{_BOUNDS[k][0]} {bounds[k]:g}" for k in _BOUNDS if k in bounds)


def check_range(value: Any, f: Field) -> str | None:
    """Why ``value`` is outside field ``f``'s range (``must be >= 1``), or None if it is in it
    (or not a number: the type check reports that)."""
    bounds = f.metadata.get("range") or {}
    if not bounds or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    ok = all(test(value, bounds[k]) for k, (_, test) in _BOUNDS.items() if k in bounds)
    return None if ok else f"must be {range_text(f)}"


def check_ranges(config: Any) -> None:
    """Check a config's own (not nested) fields against their ranges; for ``__post_init__``.

    Raises:
        ConfigError: naming the first field out of range, its value and the range.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = check_range(value, f)
        if problem:
            raise ConfigError(f"{f.name} = {value!r}: {problem}")


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-ready values (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[C], data: Mapping[str, Any], where: str = "config") -> C:
    """Build ``cls`` from ``data`` (e.g. parsed JSON), checking every key and value.

    Missing keys take their defaults. ``where`` names the source (a file) in errors.

    Raises:
        ConfigError: an unknown key, or a value that does not match the field's annotation.
    """
    return _build(cls, data, where, "")


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} = {data!r}: expected a "
                          f"table of {cls.__name__} keys")
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {prefix + unknown[0]!r}; valid keys"
                          f"{' in ' + prefix.rstrip('.') if prefix else ''}: {sorted(known)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: _check(_on_factory_default(fields[k], v), hints[k], where, prefix + k)
              for k, v in data.items()}
    for f in dataclasses.fields(cls):
        problem = check_range(values.get(f.name), f)
        if problem:
            raise ConfigError(f"{where}: {prefix + f.name} = {values[f.name]!r}: {problem}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # the dataclass's own __post_init__ checks
        raise ConfigError(f"{where}: {prefix.rstrip('.') or cls.__name__}: {e}") from None


def _on_factory_default(f: dataclasses.Field, value: Any) -> Any:
    """A partial table for a nested config whose field has a factory default (e.g. a
    distillation method's own ``optim`` defaults) fills its gaps from that default, not
    from the nested class's own defaults."""
    if not (isinstance(value, Mapping) and f.default_factory is not dataclasses.MISSING):
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    out = to_dict(default)
    deep_merge(out, value)
    return out


def _check(value: Any, tp: Any, where: str, path: str) -> Any:
    """``value`` converted to ``tp`` (int -> float, list -> tuple), or a ConfigError."""
    ok, out = _match(value, tp, where, path)
    if not ok:
        raise ConfigError(f"{where}: {path} = {value!r}: expected {type_name(tp)}")
    return out


def _match(value: Any, tp: Any, where: str, path: str) -> tuple[bool, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True, value
    if dataclasses.is_dataclass(tp):
        return (True, _build(tp, value, where, path + ".")) if isinstance(value, Mapping) \
            else (False, None)
    if origin is Literal:
        return value in args and type(value) in {type(a) for a in args}, value
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, out = _match(value, arg, where, path)
            if ok:
                return True, out
        return False, None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, None
        item = args[0] if args else Any
        out = [_check(v, item, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return True, tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else None
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def type_name(tp: Any) -> str:
    """A readable name of an annotation: ``int``, ``one of 'a', 'b'``, ``list of int``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {type_name(args[0]) if args else 'values'}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a table of {tp.__name__} keys"
    return getattr(tp, "__name__", str(tp))


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One scalar/list field of a nested config: its dotted ``path``, annotation and field."""

    path: str
    type: Any
    field: Field

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def resume(self) -> bool:
        return bool(self.field.metadata.get("resume", False))


def leaves(cls: type, prefix: str = "") -> Iterator[Leaf]:
    """Every non-dataclass field of ``cls`` and of its nested config dataclasses, in order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, f"{prefix}{f.name}.")
        else:
            yield Leaf(prefix + f.name, tp, f)


def unflatten(cls: type, flat: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """A nested dict from ``flat`` keys: a leaf's own name (``lr``) or its dotted path
    (``optim.lr``), and nested tables as they are. Lets old flat config files load."""
    by_name: dict[str, list[str]] = {}
    for leaf in leaves(cls):
        by_name.setdefault(leaf.name, []).append(leaf.path)
    groups = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in groups and isinstance(value, Mapping):
            deep_merge(out, {key: dict(value)})
            continue
        paths = [key] if "." in key else by_name.get(key, [key])
        if len(paths) > 1:
            raise ConfigError(f"{where}: key {key!r} is ambiguous; write one of {paths}")
        _set(out, paths[0], value)
    return out


def deep_merge(out: dict[str, Any], new: Mapping[str, Any]) -> None:
    """Merge ``new`` into ``out`` in place, table by table."""
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            deep_merge(out[k], v)
        else:
            out[k] = dict(v) if isinstance(v, Mapping) else v


def _set(out: dict[str, Any], path: str, value: Any) -> None:
    *parents, name = path.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    node[name] = value


def changed_fields(old: Any, new: Any) -> list[Leaf]:
    """The leaves whose values differ between two configs of the same class."""
    a, b = to_dict(old), to_dict(new)
    out = []
    for leaf in leaves(type(old)):
        if _get(a, leaf.path) != _get(b, leaf.path):
            out.append(leaf)
    return out


def _get(d: Mapping[str, Any], path: str) -> Any:
    for p in path.split("."):
        d = d[p]
    return d
