"""Errors a user can cause end in one clear line from the CLI, before any training, never a traceback."""

import argparse
import os
import shutil
import subprocess
import sys

import pytest

from distill import train
from distill.cli import build_parser, main
from distill.errors import NonFiniteError
from distill.models import load_tokenizer

from conftest import DATA, ROOT, STUDENT, TEACHER

BASE = {
    "model_name_or_path": STUDENT,
    "teacher_model_name_or_path": TEACHER,
    "dataset": str(DATA / "corpus_train.jsonl"),
    "max_steps": 1,
    "use_cpu": "true",
}


def run_cli(tmp_path, capsys, **changes):
    values = {**BASE, "output_dir": str(tmp_path / "out"), **changes}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in values.items() if v is not None))
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "the error came after training had started"
    return code, err


def assert_clear(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    # datasets may draw a progress bar on stderr first; the error is one line of its own, the last.
    assert err.strip().splitlines()[-1].startswith("distill train: error:"), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    "changes,needles",
    [
        ({"model_name_or_path": "/nowhere/student"}, ["model path not found", "/nowhere/student"]),
        ({"teacher_model_name_or_path": "./missing-teacher"}, ["model path not found"]),
        ({"model_name_or_path": "student.gguf"}, ["GGUF file, which cannot be trained"]),
        ({"alpha": 1.5}, ["alpha must be in [0, 1]"]),
        ({"temperature": 0}, ["temperature must be > 0"]),
        ({"loss_type": "kl"}, ["unknown loss_type 'kl'", "forward_kl"]),
        ({"temprature": 2.0}, ["unknown recipe key 'temprature'", "did you mean 'temperature'"]),
        ({"dataset": str(DATA / "prompts.jsonl")}, ["has a `prompt` column but no `completion`", "lmbda: 1"]),
        ({"dataset": None}, ["dataset is required"]),
    ],
    ids=[
        "student-path",
        "teacher-path",
        "gguf-student",
        "alpha",
        "temperature",
        "loss-type",
        "unknown-key",
        "no-column",
        "no-dataset",
    ],
)
def test_bad_recipe_gives_one_clear_error(tmp_path, capsys, changes, needles):
    assert_clear(*run_cli(tmp_path, capsys, **changes), *needles)


def test_empty_dataset_is_refused(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert_clear(*run_cli(tmp_path, capsys, dataset=str(tmp_path / "empty.jsonl")), "empty")


def test_teacher_with_a_different_tokenizer_and_no_chat_template_is_refused_for_chat_data(tmp_path, capsys):
    """Another tokenizer is accepted (cross-tokenizer distillation, tests/test_xtoken_train.py), but chat
    data is rendered with each side's own template: a teacher without one is refused, clearly."""
    other = tmp_path / "other_teacher"
    shutil.copytree(TEACHER, other)
    (other / "chat_template.jinja").unlink()
    tokenizer = load_tokenizer(TEACHER)
    tokenizer.add_tokens(["<other-family>"])
    tokenizer.chat_template = None
    tokenizer.save_pretrained(other)
    changes = {"teacher_model_name_or_path": str(other), "dataset": str(DATA / "chat_train.jsonl")}
    assert_clear(*run_cli(tmp_path, capsys, **changes), "no chat template")


def test_missing_recipe_and_bad_override_are_clear(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in BASE.items()))
    assert main(["train", str(recipe), "--alpha"]) == 2
    assert "override --alpha has no value" in capsys.readouterr().err


def test_the_script_entry_point_reports_errors_without_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in {**BASE, "alpha": -1}.items()))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill.py"), str(recipe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "alpha must be in [0, 1]" in proc.stderr and "Traceback" not in proc.stderr


def test_a_plain_value_error_inside_a_job_is_a_bug_and_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Only a UserError is shown as the user's mistake; a ValueError from distill's own code (or a
    library's) propagates with its traceback instead of passing for a bad recipe."""

    def bug(*args, **kwargs):
        raise ValueError("bug")

    monkeypatch.setattr(train, "run", bug)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in BASE.items()))
    with pytest.raises(ValueError, match="bug"):
        main(["train", str(recipe)])
    assert "error:" not in capsys.readouterr().err


def test_a_non_finite_training_value_stops_the_job_with_exit_code_1(tmp_path, monkeypatch, capsys):
    def diverges(*args, **kwargs):
        raise NonFiniteError("the loss is nan at step 3")

    monkeypatch.setattr(train, "run", diverges)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in BASE.items()))
    assert main(["train", str(recipe)]) == 1
    assert capsys.readouterr().err.strip() == "distill train: stopped: the loss is nan at step 3"


# --- one spelling for every flag ----------------------------------------------------------------------


def test_every_flag_of_every_subcommand_is_spelled_with_underscores_like_the_recipe_keys():
    (subcommands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    flags = [
        f"distill {name} {option}"
        for name, parser in subcommands.choices.items()
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]
    assert "distill eval --run_dir" in flags and "distill cost --seq_len" in flags
    assert [flag for flag in flags if "-" in flag.rpartition(" --")[2]] == []


def test_the_dashed_spelling_of_a_flag_is_the_same_flag(capsys):
    """`--seq-len 128` is `--seq_len 128` (also written `--seq-len=128`), in `distill cost` as in the
    recipe overrides; `--price` is the short form of `--gpu_hour_price`, in `distill cost` and
    `distill eval` alike."""
    plan = ["cost", "--student", STUDENT, "--teacher", TEACHER, "--tokens", "409600"]
    spellings = [
        ["--seq_len", "128", "--gpu_hour_price", "2.5", "--server_pflops", "3"],
        ["--seq-len=128", "--gpu-hour-price", "2.5", "--server-pflops", "3"],
        ["--seq-len", "128", "--price", "2.5", "--server_pflops=3"],
    ]
    printed = []
    for flags in [[], *spellings]:
        assert main(plan + flags) == 0
        printed.append(capsys.readouterr().out)
    default, *same = printed
    assert same[0] == same[1] == same[2] != default

    for flag in ("--help_keys", "--help-keys"):
        assert main(["train", flag]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[-1] == printed[-2] and "temperature" in printed[-1]


def test_output_cut_short_by_a_closed_pipe_ends_quietly():
    """`distill train --help_keys | head -1`: once the reader has gone, the rest of the output has nowhere
    to go, and that is no error: no BrokenPipeError traceback. Here the reader is gone before the first
    write, which `head` makes likely for any output longer than the pipe holds."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        process = subprocess.run([sys.executable, "-m", "distill.cli", "train", "--help_keys"], cwd=ROOT,
                                 stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(writer)
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr and "BrokenPipe" not in process.stderr


def test_a_launched_job_that_succeeded_destroys_its_process_group_and_one_that_failed_leaves_it(tmp_path):
    """A group left to the interpreter's exit keeps its worker threads into finalisation (end_process_group);
    after a failure another process may still be inside a collective, so the launcher stops them instead."""
    import torch.distributed as dist

    plan = ["cost", "--student", "135M", "--teacher", "1.7B", "--tokens", "1B"]
    for job, code, left in ((plan, 0, False), ([*plan[:-1], "many"], 2, True)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / job[-1]}", rank=0, world_size=1)
        try:
            assert main(job) == code
            assert dist.is_initialized() is left
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
