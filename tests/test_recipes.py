"""Every recipe parses into the dataclasses of the job its first line runs, so configs never
drift from code."""

import re
from pathlib import Path

import pytest
import transformers.training_args
import yaml

import distill.config
from distill import finetune, generate, prune, train
from distill.errors import UserError
from distill.recipe import parse

from conftest import ROOT

# The job each recipe's opening command runs -> the dataclasses that job parses.
JOBS = {
    "distill train": train.ARGUMENTS,
    "scripts/distill.py": train.ARGUMENTS,
    "distill generate": generate.ARGUMENTS,
    "distill finetune": finetune.ARGUMENTS,
    "scripts/finetune.py": finetune.ARGUMENTS,
    "distill prune": prune.ARGUMENTS,
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
    # GPU recipes (bf16: true) parse here too: whether this machine has bf16 is the launch's check.
    monkeypatch.setattr(distill.config, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
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


def test_yaml_1_1_quirks_are_read_as_an_ml_config_means_them(tmp_path):
    """`1e-4` is a number (YAML 1.1 says string) and `save_strategy: no` is "no" (YAML 1.1 says False)."""
    from distill.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model_name_or_path: s\nteacher_model_name_or_path: t\ndataset: d.jsonl\n"
        f"output_dir: {tmp_path}\nlearning_rate: 1e-4\nsave_strategy: no\n"
    )
    data = load_recipe(str(recipe), ["--weight_decay", "5e-2", "--eval_strategy=no"])
    _, _, config = parse(data, train.ARGUMENTS)
    assert config.learning_rate == 1e-4 and config.weight_decay == 0.05
    assert config.save_strategy == "no" and config.eval_strategy == "no"


def test_unknown_keys_are_refused_with_a_suggestion():
    with pytest.raises(ValueError, match="unknown recipe key 'lerning_rate' \\(did you mean 'learning_rate'\\?\\)"):
        parse(
            {"model_name_or_path": "s", "teacher_model_name_or_path": "t", "dataset": "d", "lerning_rate": 1},
            train.ARGUMENTS,
        )


MINIMAL = {"model_name_or_path": "s", "teacher_model_name_or_path": "t", "dataset": "d.jsonl", "use_cpu": True}


def test_what_training_arguments_itself_refuses_is_a_user_error(tmp_path):
    """TrainingArguments' own __post_init__ checks raise plain ValueErrors; from a recipe they are the
    user's to fix, so parse hands them on as UserError (one line at the CLI, not a traceback)."""
    with pytest.raises(UserError, match="bad recipe value: bogus is not a valid SchedulerType"):
        parse({**MINIMAL, "output_dir": str(tmp_path), "lr_scheduler_type": "bogus"}, train.ARGUMENTS)


def test_integer_keys_take_whole_numbers_in_any_spelling_and_nothing_else(tmp_path):
    """`max_steps: 1e4` (YAML 1.1: the string "1e4", read as the float 10000.0) is the integer 10000;
    a fraction or a boolean is refused rather than truncated or read as 0/1."""
    _, data_args, config = parse(
        {**MINIMAL, "output_dir": str(tmp_path), "max_steps": 1e4, "max_length": "64", "save_steps": "1e2"},
        train.ARGUMENTS,
    )
    assert config.max_steps == 10000 and type(config.max_steps) is int
    assert data_args.max_length == 64 and config.save_steps == 100
    for value in (2.5, True, "ten"):
        with pytest.raises(UserError, match=f"max_steps: {value!r} is not an integer"):
            parse({**MINIMAL, "output_dir": str(tmp_path), "max_steps": value}, train.ARGUMENTS)
