"""A mistake a user can make (a recipe value, the output folder, a damaged checkpoint, the data) ends
`distill train` / `distill finetune` with exit code 2 and one line that names what is wrong and how to
fix it, before any model loads; never with a traceback after the models have loaded."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from distill import adapters
from distill.cli import main

from conftest import ROOT, TEACHER

RECIPES = {"train": "recipes/tiny_cpu.yaml", "finetune": "recipes/tiny_cpu_finetune.yaml"}
# The fine-tuning recipe adapts runs/tiny_cpu, the output of the train recipe; these tests need no
# trained model, only one that exists.
FINETUNE_MODEL = ["--model_name_or_path", "tiny_models/student"]


class ModelLoaded(Exception):
    """Raised in place of loading a model: a run that gets there has passed every check."""


@pytest.fixture(autouse=True)
def no_models(monkeypatch):
    def load(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.chdir(ROOT)  # the recipes' paths are relative to the repo
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(adapters, "load_student", load)


def distill(command, tmp_path, capsys, *overrides, output_dir=None):
    """Run the command on its tiny recipe; (exit code, stderr)."""
    extra = FINETUNE_MODEL if command == "finetune" else []
    out = str(output_dir or tmp_path / "out")
    code = main([command, RECIPES[command], "--output_dir", out, *extra, *overrides])
    return code, capsys.readouterr().err


def assert_one_line(command, code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    # datasets may draw a progress bar on stderr first; the error is the last line, and one line.
    assert err.strip().splitlines()[-1].startswith(f"distill {command}: error:"), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("steps", [0, -2])
def test_gradient_accumulation_steps_below_one_is_refused(tmp_path, capsys, steps):
    """Unchecked, 0 divides by zero inside the Trainer and a negative count trains nothing."""
    code, err = distill("train", tmp_path, capsys, "--gradient_accumulation_steps", str(steps))
    assert_one_line("train", code, err, "gradient_accumulation_steps must be a whole number >= 1", f"got {steps}")


@pytest.mark.parametrize("command", ["train", "finetune"])
@pytest.mark.parametrize("key", ["per_device_train_batch_size", "per_device_eval_batch_size"])
@pytest.mark.parametrize("size", [0, -1])
def test_a_batch_size_below_one_is_refused(tmp_path, capsys, command, key, size):
    """TrainingArguments takes any integer; unchecked, the DataLoader fails with a traceback once the
    models have loaded."""
    code, err = distill(command, tmp_path, capsys, f"--{key}", str(size))
    assert_one_line(command, code, err, f"{key} must be a whole number >= 1", f"got {size}")


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("learning_rate", "abc", "learning_rate: 'abc' is not a number; learning_rate takes a float"),
        ("seed", "abc", "seed: 'abc' is not an integer; seed takes an integer"),
        ("temperature", "abc", "temperature: 'abc' is not a number; temperature takes a float"),
        ("seed", "true", "seed: True is not an integer"),
        ("max_steps", "2.5", "max_steps: 2.5 is not an integer"),
        ("max_train_samples", "many", "max_train_samples: 'many' is not an integer"),
        ("use_cpu", "maybe", "use_cpu: 'maybe' is not true or false"),
    ],
)
def test_a_value_a_numeric_or_boolean_key_cannot_take_is_refused_naming_key_value_and_type(
    tmp_path, capsys, key, value, expected
):
    code, err = distill("train", tmp_path, capsys, f"--{key}", value)
    assert_one_line("train", code, err, expected)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    code, err = distill("train", tmp_path, capsys)
    assert_one_line("train", code, err, f"output_dir {tmp_path / 'out'} is a file", "give a folder path")


def test_an_output_dir_nothing_can_be_written_in_is_refused(tmp_path, capsys):
    """/proc refuses new files even to root, for whom permission bits mean nothing: the check writes."""
    code, err = distill("train", tmp_path, capsys, output_dir="/proc/distill-test/out")
    assert_one_line("train", code, err, "output_dir /proc/distill-test/out is not writable", "choose a directory")


def checkpoint(folder, step):
    """A checkpoint folder in the formats the Trainer writes (weights, optimizer, state)."""
    folder = folder / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"weight": torch.zeros(64, 64)}, folder / "model.safetensors")
    torch.save({"state": {0: torch.zeros(64, 64)}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("command,damaged", [("train", "optimizer.pt"), ("finetune", "model.safetensors")])
def test_resuming_from_a_damaged_newest_checkpoint_names_it_and_the_one_before(tmp_path, capsys, command, damaged):
    out = tmp_path / "out"
    checkpoint(out, 2)
    cut_in_half(checkpoint(out, 4) / damaged)
    code, err = distill(command, tmp_path, capsys, "--resume_from_checkpoint", "true")
    assert_one_line(
        command, code, err, f"checkpoint {out / 'checkpoint-4'} is damaged", damaged,
        f"--resume_from_checkpoint {out / 'checkpoint-2'}", f"delete {out / 'checkpoint-4'}",
    )  # fmt: skip
    with pytest.raises(ModelLoaded):  # and the one it names is resumed from
        distill(command, tmp_path, capsys, "--resume_from_checkpoint", str(out / "checkpoint-2"))


def test_a_damaged_checkpoint_with_no_whole_one_before_says_to_delete_it(tmp_path, capsys):
    out = tmp_path / "out"
    cut_in_half(checkpoint(out, 2) / "optimizer.pt")
    cut_in_half(checkpoint(out, 4) / "trainer_state.json")
    code, err = distill("train", tmp_path, capsys, "--resume_from_checkpoint", str(out / "checkpoint-4"))
    assert_one_line(
        "train", code, err, "trainer_state.json", f"no earlier checkpoint is whole: delete {out / 'checkpoint-4'}"
    )


def test_max_length_beyond_the_students_positions_is_refused_with_both_numbers(tmp_path, capsys):
    code, err = distill("train", tmp_path, capsys, "--max_length", "1024")
    assert_one_line("train", code, err, "max_length 1024", "student", "max_position_embeddings 512", "512 or less")


def test_max_length_beyond_the_teachers_positions_is_refused_with_both_numbers(tmp_path, capsys):
    teacher = tmp_path / "short_teacher"
    shutil.copytree(TEACHER, teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 100}))
    code, err = distill("train", tmp_path, capsys, "--teacher_model_name_or_path", str(teacher))  # max_length 128
    assert_one_line("train", code, err, "max_length 128", f"teacher {teacher}", "max_position_embeddings 100")


FINISHED = {
    "model": {"config.json": "{}", "model.safetensors": ""},
    "adapter": {"adapter_config.json": "{}"},
    "metrics": {"metrics.json": "{}"},
}


@pytest.mark.parametrize("command", ["train", "finetune"])
@pytest.mark.parametrize("finished", FINISHED)
def test_a_new_run_into_a_finished_runs_output_dir_is_refused(tmp_path, capsys, command, finished):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in FINISHED[finished].items():
        (out / name).write_text(text)
    code, err = distill(command, tmp_path, capsys)
    assert_one_line(
        command, code, err, f"output_dir {out} already holds a finished run",
        "overwrite_output_dir: true", "resume_from_checkpoint: true",
    )  # fmt: skip


def test_overwrite_output_dir_allows_a_run_into_a_finished_runs_output_dir(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text("{}")
    with pytest.raises(ModelLoaded):
        distill("train", tmp_path, capsys, "--overwrite_output_dir", "true")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("command", ["train", "finetune"])
@pytest.mark.parametrize("split", ["dataset", "eval_dataset"])
def test_data_whose_completions_are_all_empty_is_refused(tmp_path, capsys, command, split):
    """Each row would keep only its EOS as a target: the run would train, and exit 0, on nothing."""
    empty = write_rows(tmp_path / "empty.jsonl", [{"prompt": f"Q{i}: who?\nA:", "completion": ""} for i in range(8)])
    code, err = distill(command, tmp_path, capsys, f"--{split}", empty)
    assert_one_line(command, code, err, f"{empty} has nothing to train on", "completion is empty", "all 8 rows")
