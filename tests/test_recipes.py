"""Every recipe parses into the dataclasses of the job its first line runs, so configs never
drift from code."""

import re
from pathlib import Path

import pytest
import yaml

from distill import finetune, generate, train
from distill.recipe import parse

from conftest import ROOT

# The job each recipe's opening command runs -> the dataclasses that job parses.
JOBS = {
    "distill train": train.ARGUMENTS,
    "scripts/distill.py": train.ARGUMENTS,
    "distill generate": generate.ARGUMENTS,
    "distill finetune": finetune.ARGUMENTS,
    "scripts/finetune.py": finetune.ARGUMENTS,
}

RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def job_of(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path} must open with the command that runs it"
    assert str(path.relative_to(ROOT)) in first, f"{path}: the opening command does not name the recipe itself"
    for command, arguments in JOBS.items():
        if command in first:
            return arguments
    raise AssertionError(f"{path}: unknown job in {first!r}")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_into_its_jobs_config(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = yaml.safe_load(path.read_text())
    parsed = parse(data, job_of(path))
    values = {k: v for obj in parsed for k, v in vars(obj).items()}
    for key, value in data.items():  # every key landed, with its value
        assert key in values
        assert values[key] == value or values[key] == [value], f"{path.name}: {key}: {values[key]!r} != {value!r}"


def test_there_are_recipes_to_check():
    assert any(p.name == "tiny_cpu.yaml" for p in RECIPES)


def test_local_paths_in_recipes_exist():
    for path in RECIPES:
        for key, value in yaml.safe_load(path.read_text()).items():
            if isinstance(value, str) and re.match(r"^(tiny_models|recipes)/", value):
                assert (ROOT / value).exists(), f"{path.name}: {key}: {value} does not exist"
