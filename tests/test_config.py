"""Typed configs: JSON round trip, refusal of unknown keys and wrong types, flat keys, and the
command-line options generated from the same fields."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Literal

import pytest

from difflab.cli.options import add_config_options, given_options
from difflab.config import (
    ConfigError,
    changed_fields,
    from_dict,
    leaves,
    option,
    to_dict,
    unflatten,
)


@dataclass
class Inner:
    width: int = option(32, "network width")
    mult: tuple[int, ...] = option((1, 2), "width multipliers")
    act: Literal["silu", "relu"] = option("silu", "activation")


@dataclass
class Outer:
    lr: float = option(1e-3, "learning rate")
    steps: int = option(10, "steps", resume=True)
    name: str | None = option(None, "a name")
    flag: bool = option(False, "a switch", resume=True)
    tags: list[str] = option(factory=list, help="tags")
    net: Inner = option(factory=Inner, help="the network")


def test_json_round_trip_is_exact():
    c = Outer(lr=0.5, steps=3, name="x", flag=True, tags=["a"], net=Inner(64, (1, 2, 4), "relu"))
    assert from_dict(Outer, json.loads(json.dumps(to_dict(c)))) == c
    assert from_dict(Outer, {}) == Outer()
    assert from_dict(Outer, {"lr": 1}).lr == 1.0 and isinstance(from_dict(Outer, {"lr": 1}).lr,
                                                                 float)


@pytest.mark.parametrize("data, words", [
    ({"lr": "fast"}, ["lr", "'fast'", "float"]),
    ({"steps": 2.5}, ["steps", "2.5", "int"]),
    ({"steps": True}, ["steps", "True", "int"]),
    ({"flag": "yes"}, ["flag", "'yes'", "bool"]),
    ({"net": {"act": "gelu"}}, ["net.act", "'gelu'", "'silu', 'relu'"]),
    ({"net": {"mult": [1, "2"]}}, ["net.mult[1]", "'2'", "int"]),
    ({"net": 3}, ["net", "3", "Inner"]),
    ({"tags": "a"}, ["tags", "'a'", "list of str"]),
    ({"lrr": 1.0}, ["unknown key", "'lrr'", "lr"]),
    ({"net": {"depth": 2}}, ["unknown key", "'net.depth'", "width"]),
])
def test_bad_values_and_keys_name_the_key_value_and_type(data, words):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data, where="my.toml")
    msg = str(e.value)
    assert msg.startswith("my.toml: ")
    for w in words:
        assert w in msg


def test_flat_and_dotted_keys_unflatten():
    nested = unflatten(Outer, {"lr": 0.1, "width": 8, "net.act": "relu", "net": {"mult": [3]}})
    assert from_dict(Outer, nested) == Outer(lr=0.1, net=Inner(8, (3,), "relu"))


def test_changed_fields_and_resume_marks():
    a, b = Outer(), Outer(steps=20, net=Inner(width=8))
    changed = {leaf.path: leaf.resume for leaf in changed_fields(a, b)}
    assert changed == {"steps": True, "net.width": False}
    assert [leaf.path for leaf in leaves(Outer)] == [
        "lr", "steps", "name", "flag", "tags", "net.width", "net.mult", "net.act"]


def test_generated_options_parse_into_the_nested_config():
    p = argparse.ArgumentParser()
    add_config_options(p, Outer)
    args = p.parse_args(["--lr", "0.25", "--flag", "--mult", "1", "2", "2", "--act", "relu"])
    given = given_options(args, Outer)
    assert given == {"lr": 0.25, "flag": True, "net": {"mult": [1, 2, 2], "act": "relu"}}
    assert from_dict(Outer, given) == Outer(lr=0.25, flag=True, net=Inner(mult=(1, 2, 2),
                                                                          act="relu"))
    assert given_options(p.parse_args([]), Outer) == {}
    assert p.parse_args(["--flag", "false"]).flag is False
    with pytest.raises(SystemExit):
        p.parse_args(["--act", "gelu"])
    text = p.format_help()
    assert "network width (default: 32)" in text and "width multipliers (default: 1 2)" in text
