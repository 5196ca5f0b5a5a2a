"""A recipe is one flat YAML file; `--key value` overrides on the command line win over it.

The keys are the fields of the dataclasses a job declares (`distill.config`), filled by
`transformers.HfArgumentParser`. An unknown key is an error, never silently ignored: a typo in
`temprature` would otherwise train with the default.

A recipe is checked once, by `parse`, the first step of every job: unknown keys (with the nearest
known one), each value's type (`_coerce`), then the dataclasses' own `__post_init__` (distill's
ranges, TrainingArguments' rules, bf16 hardware). The keys and rules are read off the dataclasses,
never written down a second time, so they hold for whichever transformers is installed. Nothing is
loaded before it; the refusal costs the import of transformers (a few seconds), no more.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path

import yaml

from distill.errors import UserError

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
            raise UserError(f"expected an override like --key value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise UserError(f"override --{key} has no value; write --{key} VALUE")
            value, i = tokens[i + 1], i + 1
        out[key.replace("-", "_")] = _yaml_value(yaml.safe_load(value))
        i += 1
    return out


def load_recipe(path: str, overrides: list[str] | None = None) -> dict:
    recipe = Path(path)
    if not recipe.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} must be a mapping of key: value lines, got {type(data).__name__}")
    data = {k: _yaml_value(v) for k, v in data.items()}
    data.update(parse_overrides(overrides or []))
    return data


_PLAIN = (str, int, float, bool, type(None))


def kinds(hint) -> frozenset:
    """The plain types a field's type hint admits (``float | None`` -> {float, NoneType}): all
    `_coerce` needs to know (lists, enums and dicts pass through as they are)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return frozenset(kind for kind in _PLAIN if kind in args)


def _coerce(key: str, value, args: frozenset, default):
    """The value a field admitting the types ``args`` gets from a recipe, or a UserError naming the key.

    Numbers written as strings ("3", "0.5") become numbers, and strategy fields get their "no" when
    YAML 1.1 read `save_strategy: no` as False. A value a numeric or true/false field cannot take is
    refused here: the dataclasses do not check types, and a string learning rate would otherwise fail
    as a TypeError deep inside the Trainer, or not at all.
    """
    if value is False and bool not in args and str in args and type(None) not in args:
        return "no"
    if str in args:
        return value
    numbers = [kind for kind in (int, float) if kind in args]
    if numbers:
        return value if value is None and type(None) in args else _number(key, value, numbers[0], default)
    if bool in args and value is not None and not isinstance(value, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UserError(f"{key}: {value!r} is not true or false; write {key}: true or {key}: false")
    return value


def _number(key: str, value, kind: type, default):
    name = "an integer" if kind is int else "a number"
    problem = f"{key}: {value!r} is not {name}; {key} takes {'an integer' if kind is int else 'a float'}"
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        problem += f", e.g. {key}: {default} (its default)"
    # bool is an int to Python, but `seed: true` is a slip, never the number 1.
    if isinstance(value, bool):
        raise UserError(problem)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise UserError(problem) from None
    if not isinstance(value, (int, float)) or value != value:  # value != value: NaN passes every range check
        raise UserError(problem)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise UserError(problem)
        return int(value)  # `max_steps: 1e4` reads as the float 10000.0
    return value


def _refuse_unknown(data: dict, known) -> None:
    unknown = [k for k in data if k not in known]
    if unknown:
        hint = "; ".join(
            f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, n=1)) else "")
            for k in unknown
        )
        raise UserError(f"unknown recipe key {hint}. Run the command with --help_keys to list every key.")


def fields(dataclass_types: tuple) -> dict:
    """``{key: (kinds, default)}`` for every recipe key of ``dataclass_types``; the default only
    where it is a number (the type error's example value)."""
    out = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                number = isinstance(f.default, (int, float)) and not isinstance(f.default, bool)
                out[f.name] = (kinds(hints[f.name]), f.default if number else None)
    return out


def parse(data: dict, dataclass_types: tuple) -> tuple:
    """Fill ``dataclass_types`` from a recipe dict; unknown keys and bad values raise UserError."""
    from transformers import HfArgumentParser

    known = fields(dataclass_types)
    _refuse_unknown(data, known)
    data = {k: _coerce(k, v, *known[k]) for k, v in data.items()}
    try:
        return HfArgumentParser(dataclass_types).parse_dict(data)
    except UserError:
        raise
    except (ValueError, TypeError) as err:
        # What the dataclasses themselves refuse (TrainingArguments' own checks) is the recipe's doing.
        raise UserError(f"bad recipe value: {' '.join(str(err).split())}") from err


def describe(dataclass_types: tuple) -> str:
    """Every recipe key with its default and help, for `--help_keys`."""
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
