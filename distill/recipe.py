"""A recipe is one flat YAML file; `--key value` overrides on the command line win over it.

The keys are the fields of the dataclasses a job declares (`distill.config`), filled by
`transformers.HfArgumentParser`. An unknown key is an error, never silently ignored: a typo in
`temprature` would otherwise train with the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path

import yaml
from transformers import HfArgumentParser

# YAML 1.1 reads `1e-4` (no dot) as a string; every ML config means the number.
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _yaml_value(value):
    return float(value) if isinstance(value, str) and _SCIENTIFIC.match(value) else value


def parse_overrides(tokens: list[str]) -> dict:
    """``["--lr", "1e-4", "--bf16=true"]`` -> ``{"lr": 1e-4, "bf16": True}``; values read as YAML."""
    out, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"expected an override like --key value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"override --{key} has no value; write --{key} VALUE")
            value, i = tokens[i + 1], i + 1
        out[key.replace("-", "_")] = _yaml_value(yaml.safe_load(value))
        i += 1
    return out


def load_recipe(path: str, overrides: list[str] | None = None) -> dict:
    recipe = Path(path)
    if not recipe.is_file():
        raise ValueError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a mapping of key: value lines, got {type(data).__name__}")
    data = {k: _yaml_value(v) for k, v in data.items()}
    data.update(parse_overrides(overrides or []))
    return data


def _coerce(value, hint):
    """Give numeric fields numbers when a recipe wrote them as strings ("3", "0.5"), and strategy
    fields their "no" when YAML 1.1 read `save_strategy: no` as False."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is False and bool not in args and str in args and type(None) not in args:
        return "no"
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        if kind in args:
            try:
                return kind(value)
            except ValueError:
                continue
    return value


def parse(data: dict, dataclass_types: tuple) -> tuple:
    """Fill ``dataclass_types`` from a recipe dict; unknown keys and bad values raise ValueError."""
    hints = {}
    for cls in dataclass_types:
        hints.update({f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls) if f.init})
    unknown = [k for k in data if k not in hints]
    if unknown:
        hint = "; ".join(
            f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, hints, n=1)) else "")
            for k in unknown
        )
        raise ValueError(f"unknown recipe key {hint}. Run the command with --help-keys to list every key.")
    data = {k: _coerce(v, hints[k]) for k, v in data.items()}
    try:
        return HfArgumentParser(dataclass_types).parse_dict(data)
    except TypeError as err:
        raise ValueError(f"bad recipe value: {err}") from err


def describe(dataclass_types: tuple) -> str:
    """Every recipe key with its default and help, for `--help-keys`."""
    lines = []
    for cls in dataclass_types:
        lines.append(f"\n[{cls.__name__}]")
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                else:
                    default = "(required)"
                lines.append(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
