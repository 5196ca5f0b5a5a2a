"""A recipe's keys and values are checked once, by the job's own dataclasses (`distill.recipe.parse`:
the keys and value types read off their fields, the ranges in their `__post_init__`), as the job's
first step: a bad one ends the CLI with exit code 2 and one line naming it, before any model,
tokenizer or dataset loads; the nearest good value gets past every check."""

import datasets
import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import finetune, generate, train
from distill.cli import main
from distill.config import DTYPES
from distill.losses import LOSS_TYPES
from distill.recipe import fields, parse

from conftest import DATA, STUDENT, TEACHER

JOBS = {"train": train.ARGUMENTS, "finetune": finetune.ARGUMENTS, "generate": generate.ARGUMENTS}


def valid(job, tmp_path):
    """A recipe for ``job`` that passes every check up to the first load."""
    return {
        "train": {
            "model_name_or_path": STUDENT,
            "teacher_model_name_or_path": TEACHER,
            "dataset": str(DATA / "corpus_train.jsonl"),
            # room for on-policy samples (max_new_tokens) within the tiny models' 512 positions
            "max_length": 128,
            "output_dir": str(tmp_path / "out"),
        },
        "finetune": {
            "model_name_or_path": STUDENT,
            "dataset": str(DATA / "domain_train.jsonl"),
            "output_dir": str(tmp_path / "out"),
        },
        "generate": {
            "teacher_model_name_or_path": TEACHER,
            "prompts": str(DATA / "prompts.jsonl"),
            "output_file": str(tmp_path / "out.jsonl"),
        },
    }[job]


# key: (a value refused, the one line that refuses it, the nearest value accepted)
TRAINING_RANGES = {
    "alpha": (1.5, "alpha must be in [0, 1] (weight of the KD term), got 1.5", 1.0),
    "beta": (-0.1, "beta must be in [0, 1], got -0.1", 0.0),
    "temperature": (0, "temperature must be > 0, got 0", 0.5),
    "loss_type": ("kl", "unknown loss_type 'kl'; choose one of forward_kl, reverse_kl, jsd", "jsd"),
    "teacher_top_k": (0, "teacher_top_k must be >= 1, got 0", 1),
    "dtype": ("fp8", "dtype='fp8' is not a dtype distill knows; use one of auto, float32, bfloat16, float16", "auto"),
    "teacher_dtype": (
        "fp8",
        "teacher_dtype='fp8' is not a dtype distill knows; use one of auto, float32, bfloat16, float16",
        "float16",
    ),
    "lora_r": (0, "lora_r must be a positive integer (the adapter rank), got 0", 1),
    "lora_alpha": (0, "lora_alpha must be > 0 (the scale is lora_alpha / lora_r), got 0", 1),
    "lora_dropout": (1.0, "lora_dropout must be in [0, 1), got 1.0", 0.0),
    "eval_fraction": (1.0, "eval_fraction must be in [0, 1), got 1.0", 0.0),
    "max_length": (1, "max_length must be at least 2 tokens, got 1", 2),
    "peak_tflops": (0, "peak_tflops must be > 0 (TFLOP/s of one device), got 0", 0.5),
    "gpu_hour_price": (-1, "gpu_hour_price must be >= 0 ($ per device-hour), got -1", 0),
    "gradient_accumulation_steps": (
        0,
        "gradient_accumulation_steps must be a whole number >= 1 (micro-batches per optimizer step), got 0",
        1,
    ),
    "teacher_server_timeout": (0, "teacher_server_timeout must be > 0 seconds, got 0", 0.5),
    "teacher_server_batch_size": (0, "teacher_server_batch_size must be >= 1, got 0", 1),
    "teacher_server_retries": (-1, "teacher_server_retries must be >= 0, got -1", 0),
    "vllm_sync_steps": (0, "vllm_sync_steps must be >= 1, got 0", 1),
    "lmbda": (1.5, "lmbda must be in [0, 1] (the on-policy fraction of batches), got 1.5", 1.0),
}
# `distill generate`'s own: some names mean something else there (max_new_tokens, top_p, batch_size).
GENERATE_RANGES = {
    "temperature": (0, "temperature must be > 0, got 0", 0.5),
    "dtype": TRAINING_RANGES["dtype"],
    "max_new_tokens": (0, "max_new_tokens must be at least 1, got 0", 1),
    "batch_size": (0, "batch_size must be at least 1, got 0", 1),
    "max_prompts": (0, "max_prompts must be at least 1, got 0", 1),
    "top_p": (0, "top_p must be in (0, 1], got 0", 1.0),
}
CASES = (
    [("train", key, *rule) for key, rule in TRAINING_RANGES.items()]
    # finetune shares the model, data and run settings: the rules of those that are its keys
    + [("finetune", key, *rule) for key, rule in TRAINING_RANGES.items() if key in fields(finetune.ARGUMENTS)]
    + [("generate", key, *rule) for key, rule in GENERATE_RANGES.items()]
)


class Loaded(BaseException):
    """Raised in place of loading a model, tokenizer or dataset: a run that gets there passed every check.
    Not an Exception, so that the `except Exception` around a dataset load does not make it a UserError."""


@pytest.fixture(autouse=True)
def nothing_loads(monkeypatch):
    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", load)
    monkeypatch.setattr(datasets, "load_dataset", load)


def cli(job, tmp_path, capsys, values=None, overrides=()):
    """`distill JOB recipe.yaml OVERRIDES` on the job's valid recipe with ``values`` set: (exit code, stderr)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**valid(job, tmp_path), **(values or {})}))
    code = main([job, str(recipe), *overrides])
    return code, capsys.readouterr().err


def assert_refused(job, code, err, message):
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"distill {job}: error: {message}", err


def test_every_job_has_range_rules_to_check():
    assert {job for job, *_ in CASES} == set(JOBS)


@pytest.mark.parametrize("job,key,bad,message,good", CASES, ids=[f"{job}-{key}" for job, key, *_ in CASES])
def test_a_value_out_of_range_is_refused_before_anything_loads_and_the_nearest_good_one_passes(
    tmp_path, capsys, job, key, bad, message, good
):
    assert_refused(job, *cli(job, tmp_path, capsys, {key: bad}), message)
    with pytest.raises(Loaded):
        cli(job, tmp_path, capsys, {key: good})


@pytest.mark.parametrize("key,value", [("loss_type", t) for t in LOSS_TYPES] + [("dtype", d) for d in DTYPES])
def test_every_loss_type_and_dtype_distill_knows_is_accepted(tmp_path, key, value):
    parse({**valid("train", tmp_path), key: value}, train.ARGUMENTS)


@pytest.mark.parametrize(
    "job,override,message",
    [
        ("train", ["--temprature", "2"], "unknown recipe key 'temprature' (did you mean 'temperature'?)"),
        ("finetune", ["--lerning_rate", "1e-3"], "unknown recipe key 'lerning_rate' (did you mean 'learning_rate'?)"),
        ("generate", ["--max_new_token", "8"], "unknown recipe key 'max_new_token' (did you mean 'max_new_tokens'?)"),
        ("train", ["--learning_rate", "abc"], "learning_rate: 'abc' is not a number; learning_rate takes a float"),
        ("generate", ["--seed", "1.5"], "seed: 1.5 is not an integer; seed takes an integer"),
        ("finetune", ["--use_peft", "maybe"], "use_peft: 'maybe' is not true or false"),
    ],
    ids=["train-unknown-key", "finetune-unknown-key", "generate-unknown-key", "train-type", "generate-type", "bool"],
)
def test_an_unknown_key_or_a_value_of_the_wrong_type_is_refused_before_anything_loads(
    tmp_path, capsys, job, override, message
):
    code, err = cli(job, tmp_path, capsys, overrides=override)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"distill {job}: error: {message}"), err


def test_cache_teacher_checks_its_recipe_before_anything_loads(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    values = {**valid("train", tmp_path), "teacher_cache": str(tmp_path / "cache"), "alpha": 2}
    recipe.write_text(yaml.safe_dump(values))
    code = main(["cache-teacher", str(recipe)])
    assert_refused(
        "cache-teacher", code, capsys.readouterr().err, "alpha must be in [0, 1] (weight of the KD term), got 2"
    )
