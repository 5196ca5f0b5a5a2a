"""A bad recipe is refused before torch and transformers are imported, exactly as the full parse
would refuse it: the quick check (distill.recipe.check_quickly) never disagrees with the dataclasses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill import finetune, generate, recipe_keys, train
from distill.config import DTYPES
from distill.errors import UserError
from distill.losses import LOSS_TYPES
from distill.recipe import QUICK_CHECKS, QUICK_CHECKS_GENERATE, check_quickly, parse

from conftest import DATA, ROOT, STUDENT, TEACHER

JOBS = {"train": train.ARGUMENTS, "finetune": finetune.ARGUMENTS, "generate": generate.ARGUMENTS}
VALID = {
    "train": {"model_name_or_path": STUDENT, "teacher_model_name_or_path": TEACHER, "dataset": "d.jsonl"},
    "finetune": {"model_name_or_path": STUDENT, "dataset": "d.jsonl"},
    "generate": {"teacher_model_name_or_path": TEACHER, "prompts": "p.jsonl", "output_file": "out.jsonl"},
}
# key: (a value the job refuses, the nearest value it accepts)
EXAMPLES = {
    "alpha": (1.5, 1.0),
    "beta": (-0.1, 0.0),
    "temperature": (0, 0.5),
    "loss_type": ("kl", "jsd"),
    "teacher_top_k": (0, 1),
    "dtype": ("fp8", "bfloat16"),
    "teacher_dtype": ("fp8", "float16"),
    "lora_r": (0, 1),
    "lora_alpha": (0, 1),
    "lora_dropout": (1.0, 0.0),
    "eval_fraction": (1.0, 0.0),
    "max_length": (1, 2),
    "peak_tflops": (0, 0.5),
    "gpu_hour_price": (-1, 0),
    "gradient_accumulation_steps": (0, 1),
    "max_new_tokens": (0, 1),
    "batch_size": (0, 1),
    "max_prompts": (0, 1),
    "top_p": (0, 1.0),
    "teacher_server_timeout": (0, 0.5),
    "teacher_server_batch_size": (0, 1),
    "teacher_server_retries": (-1, 0),
    "vllm_sync_steps": (0, 1),
}
CASES = [
    (job, key)
    for job in JOBS
    for key in (QUICK_CHECKS_GENERATE if job == "generate" else QUICK_CHECKS)
    if key in recipe_keys.JOBS[job]
]


def recipe(tmp_path, job, values):
    out = {} if job == "generate" else {"output_dir": str(tmp_path / "out")}
    return {**VALID[job], **out, **values}


def quick(tmp_path, job, values):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, job, values)))
    check_quickly(job, str(path))


def full(tmp_path, job, values):
    parse(recipe(tmp_path, job, values), JOBS[job])


def test_the_written_down_keys_are_the_dataclasses_fields():
    """distill/recipe_keys.py is what `python -m distill.recipe_keys` writes from the dataclasses now."""
    stored = Path(recipe_keys.__file__).read_text(encoding="utf-8")
    assert recipe_keys.render() == stored, "recipe keys changed: run `python -m distill.recipe_keys`"


def test_every_quick_check_has_an_example():
    assert set(QUICK_CHECKS) | set(QUICK_CHECKS_GENERATE) <= set(EXAMPLES)


@pytest.mark.parametrize("job,key", CASES, ids=[f"{job}-{key}" for job, key in CASES])
def test_a_quick_check_refuses_what_the_dataclasses_refuse_with_their_message(tmp_path, job, key):
    bad, good = EXAMPLES[key]
    with pytest.raises(UserError) as refused:
        full(tmp_path, job, {key: bad})
    with pytest.raises(UserError) as quickly:
        quick(tmp_path, job, {key: bad})
    assert str(quickly.value) == str(refused.value)
    full(tmp_path, job, {key: good})
    quick(tmp_path, job, {key: good})


@pytest.mark.parametrize("key,value", [("loss_type", t) for t in LOSS_TYPES] + [("dtype", d) for d in DTYPES])
def test_every_loss_type_and_dtype_distill_knows_passes_the_quick_check(tmp_path, key, value):
    quick(tmp_path, "train", {key: value})


def cli_in_a_fresh_interpreter(argv: list[str]) -> tuple[dict, str]:
    """({"code": the CLI's exit code, "heavy": which of torch and transformers were imported when it
    returned}, its stderr), from `distill.cli.main(argv)` in a new Python process."""
    script = (
        "import json, sys\n"
        "from distill.cli import main\n"
        f"code = main({argv!r})\n"
        "print(json.dumps({'code': code, 'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        (["--alpha", "7"], "alpha must be in [0, 1]"),
        (["--temprature", "2"], "unknown recipe key 'temprature' (did you mean 'temperature'?)"),
        (["--learning_rate", "abc"], "learning_rate: 'abc' is not a number"),
    ],
    ids=["bad-value", "unknown-key", "bad-type"],
)
def test_a_bad_recipe_is_refused_before_torch_and_transformers_are_imported(tmp_path, override, message):
    """The CLI in a fresh interpreter: the error, and what had been imported when it came."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**VALID["train"], "output_dir": str(tmp_path / "out")}))
    result, stderr = cli_in_a_fresh_interpreter(["train", str(recipe), *override])
    assert result == {"code": 2, "heavy": []}, stderr
    assert message in stderr


def test_cache_teacher_checks_its_recipe_before_torch_too(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**VALID["train"], "dataset": str(DATA / "corpus_train.jsonl"), "alpha": 2}))
    result, stderr = cli_in_a_fresh_interpreter(["cache-teacher", str(recipe)])
    assert result == {"code": 2, "heavy": []}, stderr
    assert "alpha must be in [0, 1]" in stderr
