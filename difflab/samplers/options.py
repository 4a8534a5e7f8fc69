"""Sampler options as data: each sampler declares the keyword-only options it takes.

A sampler's options are declared beside it with ``declare_options``, one ``SamplerOption``
(name, Python type, default, help text, allowed values) per keyword-only parameter other than
``cond`` (the conditioning is an input, not a user option). The declaration is checked against
the signature when the module is imported, so it cannot drift from the code:

    @declare_options(SamplerOption("eta", float, 0.0, "noise scale", min=0.0))
    def ddim(denoiser, x, ts, generator=None, callback=None, *, cond=None, eta=0.0): ...

Values are validated and converted here (``check_options``, ``parse_options``), so a caller,
e.g. the command line with ``--sampler-opt eta=0.5``, gets a one-line ValueError naming the
sampler and the options it does take instead of an option silently dropped. The name-based API
(``difflab.samplers.sampler_options`` and friends) looks the sampler up in ``SAMPLERS``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

_TYPES = (bool, int, float, str)
_ATTR = "__sampler_options__"
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class SamplerOption:
    """One keyword-only option of a sampler.

    ``type`` is bool, int, float or str. Allowed values are ``choices`` (a tuple), or the bounds
    ``min`` / ``max`` (inclusive; ``min_exclusive`` makes the lower one strict). A default of
    None means "not set" (the sampler then derives the value) and None is accepted as a value.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise TypeError(f"option {self.name!r}: type must be one of bool, int, float, str, "
                            f"got {self.type!r}")
        try:
            ok = self.default is None or self.convert(self.default, "") == self.default
        except ValueError:
            ok = False
        if not ok:
            raise TypeError(f"option {self.name!r}: default {self.default!r} is not "
                            f"{self.requirement()}")

    def requirement(self) -> str:
        """What a value must be, in words: 'a float >= 0', 'one of 1, 2, 3', ..."""
        if self.choices is not None:
            req = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.type is bool:
            req = "true or false"
        else:
            req = {int: "an int", float: "a float", str: "a string"}[self.type]
            if self.min is not None:
                req += f" {'>' if self.min_exclusive else '>='} {self.min:g}"
            if self.max is not None:
                req += f"{' and' if self.min is not None else ''} <= {self.max:g}"
        return req + (" or None" if self.default is None else "")

    def convert(self, value: Any, sampler: str) -> Any:
        """``value`` as this option's type, checked against its allowed values; a ValueError
        naming the sampler, the option and the requirement otherwise."""
        if value is None and self.default is None:
            return None
        out = _as_type(value, self.type)
        if out is None or not _allowed(self, out):
            raise ValueError(f"sampler {sampler!r}: option {self.name!r} must be "
                             f"{self.requirement()}, got {value!r}")
        return out

    def parse(self, text: str, sampler: str) -> Any:
        """A value from command-line text: true/false for bools, int and float literals
        (inf too), None where the default is None, else the string itself."""
        low = text.strip().lower()
        if self.default is None and low in ("none", "null"):
            return None
        value: Any = text
        if self.type is bool:
            value = True if low in _TRUE else False if low in _FALSE else text
        elif self.type in (int, float):
            try:
                value = self.type(low)
            except ValueError:
                pass  # convert() reports it
        return self.convert(value, sampler)

    def describe(self) -> str:
        """One line: name (requirement, default): help."""
        return f"{self.name} ({self.requirement()}; default {self.default}): {self.help}"


def _as_type(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` when that loses nothing (an int for a float, 3.0 for an int),
    else None. bool is never taken for a number nor a number for a bool."""
    if isinstance(value, bool) or kind is bool:
        return value if isinstance(value, bool) and kind is bool else None
    if kind is str:
        return value if isinstance(value, str) else None
    if not isinstance(value, numbers.Real) or math.isnan(value):
        return None
    if kind is int:
        return int(value) if float(value).is_integer() else None
    return float(value)


def _allowed(opt: SamplerOption, value: Any) -> bool:
    if opt.choices is not None:
        return value in opt.choices
    if opt.min is not None and (value <= opt.min if opt.min_exclusive else value < opt.min):
        return False
    return opt.max is None or value <= opt.max


def declare_options(*options: SamplerOption) -> Callable[[Callable], Callable]:
    """Decorator: attach ``options`` to a sampler, after checking that they are exactly its
    keyword-only parameters other than ``cond``, with the same defaults (a TypeError at
    import otherwise, so the declaration cannot drift from the code)."""

    def attach(sampler: Callable) -> Callable:
        declared = {o.name: o for o in options}
        params = {p.name: p.default for p in inspect.signature(sampler).parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "cond"}
        found = {n: o.default for n, o in declared.items()}
        if len(declared) != len(options) or found != params:
            raise TypeError(f"{sampler.__name__}: declared options {found} do not match its "
                            f"keyword-only parameters {params}")
        setattr(sampler, _ATTR, MappingProxyType(declared))
        return sampler

    return attach


def declared_options(sampler: Callable) -> Mapping[str, SamplerOption]:
    """The options a sampler function declared (read-only), in declaration order."""
    try:
        return getattr(sampler, _ATTR)
    except AttributeError:
        raise TypeError(f"sampler {getattr(sampler, '__name__', sampler)!r} declares no options "
                        "(decorate it with samplers.options.declare_options)") from None


def unknown_option_error(sampler: str, declared: Mapping[str, SamplerOption],
                         names: Sequence[str]) -> ValueError:
    """The error for options a sampler does not take, naming the ones it does."""
    which = ", ".join(repr(n) for n in names)
    takes = (f"{sampler}'s options: {', '.join(declared)}" if declared
             else f"{sampler} takes no options")
    return ValueError(f"sampler {sampler!r} does not take option{'s' * (len(names) > 1)} "
                      f"{which}; {takes}")


def _reject_unknown(sampler: str, declared: Mapping[str, SamplerOption],
                    options: Mapping[str, Any]) -> None:
    unknown = [k for k in options if k not in declared]
    if unknown:
        raise unknown_option_error(sampler, declared, unknown)


def check_options(sampler: str, declared: Mapping[str, SamplerOption],
                  options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` validated against ``declared`` and converted to the declared types."""
    _reject_unknown(sampler, declared, options)
    return {k: declared[k].convert(v, sampler) for k, v in options.items()}


def parse_options(sampler: str, declared: Mapping[str, SamplerOption],
                  items: Sequence[str]) -> dict[str, Any]:
    """``["order=3", "eta=0.5"]`` parsed by the declared types and validated."""
    raw: dict[str, str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"malformed sampler option {item!r}: expected NAME=VALUE, "
                             "e.g. order=3")
        if name in raw:
            raise ValueError(f"sampler option {name!r} given twice")
        raw[name] = text
    _reject_unknown(sampler, declared, raw)
    return {k: declared[k].parse(v, sampler) for k, v in raw.items()}


def describe_options(sampler: str, declared: Mapping[str, SamplerOption]) -> str:
    """One line per option (``SamplerOption.describe``), or '<sampler> takes no options'."""
    if not declared:
        return f"{sampler} takes no options"
    return "\n".join(o.describe() for o in declared.values())


def final_order_option(default: int | None, derived: str = "",
                       gaussian: bool = True) -> SamplerOption:
    """The one name and meaning of the last-step choice (``base`` docstring): 1 returns
    x0_hat; k > 1 an Adams-Bashforth step in sigma~ to clean data through the latest k
    eps_hat; 0 (where ``gaussian``) the local-Gaussian step (``base.gaussian_final_step``).
    ``derived`` says what a None default stands for."""
    zero = ("; 0 the local-Gaussian step (x0_hat plus the share of sigma~ eps_hat a Gaussian "
            "fitted to the last two eps_hat leaves)" if gaussian else "")
    return SamplerOption(
        "final_order", int, default,
        "order of the last step to clean data: 1 returns x0_hat of the last evaluation, k > 1 "
        "an Adams-Bashforth step in sigma~ through the latest k eps_hat (grids ending at "
        f"sigma = 0){zero}{derived}", min=0 if gaussian else 1)



#: how ``final_order=0`` fits its local Gaussian (``base.final_step``)
GAUSSIAN_FITS = ("eps_ratio", "two_point")


def gaussian_fit_option() -> SamplerOption:
    """How ``final_order=0`` fits its local Gaussian (``base.final_step``)."""
    return SamplerOption(
        "gaussian_fit", str, "eps_ratio",
        "with final_order=0, how the local Gaussian is fitted: 'eps_ratio' from how much "
        "eps_hat shrank between the last two grid points (assumes both on one exact "
        "trajectory), 'two_point' by least squares of its variance to the last two "
        "evaluations wherever they were made (base.two_point_gaussian_step)",
        choices=GAUSSIAN_FITS)

__all__ = ["GAUSSIAN_FITS", "SamplerOption", "check_options", "declare_options", "declared_options",
           "describe_options", "final_order_option", "gaussian_fit_option", "parse_options",
           "unknown_option_error"]
