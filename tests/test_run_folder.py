"""What a `distill train` / `distill finetune` run leaves and says: a model card that a hub takes as it
is, TensorBoard events that carry distill's own metrics, files that follow the umask, a console log
without bars or escape codes off a terminal, and no warning the user cannot act on."""

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import warnings

import pytest
import yaml
from huggingface_hub import ModelCard

from distill.cli import main

from conftest import DATA, ROOT, STUDENT, TEACHER

SHORT = ["--max_steps", "4", "--logging_steps", "2", "--save_strategy", "no", "--max_eval_samples", "16"]
TRAIN = [str(ROOT / "recipes" / "tiny_cpu.yaml"), "--model_name_or_path", STUDENT]
TRAIN += ["--teacher_model_name_or_path", TEACHER, "--dataset", str(DATA / "corpus_train.jsonl")]
TRAIN += ["--eval_dataset", str(DATA / "corpus_eval.jsonl"), *SHORT]
FINETUNE = [str(ROOT / "recipes" / "tiny_cpu_finetune.yaml"), "--dataset", str(DATA / "domain_train.jsonl")]
FINETUNE += ["--eval_dataset", str(DATA / "domain_eval.jsonl"), *SHORT]


def run(*argv) -> list:
    """The CLI in this process, which must succeed; every warning it raised, whatever the filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(list(argv)) == 0
    return caught


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plain tiny `distill train` (the shape of recipes/tiny_cpu.yaml) that saves one checkpoint,
    then LoRA `distill finetune` of its student (recipes/tiny_cpu_finetune.yaml), each for a few
    steps; under umask 027 (not the usual 022, which a file written 0644 by fixed mode would pass), with
    stdout and stderr captured as a log file or a pipe would take them (not a terminal)."""
    out = tmp_path_factory.mktemp("runs")
    console, mask = io.StringIO(), os.umask(0o027)
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            caught = run("train", *TRAIN, "--output_dir", str(out / "train"), "--save_strategy", "steps",
                         "--save_steps", "4")  # fmt: skip
            caught += run(
                "finetune", *FINETUNE, "--model_name_or_path", str(out / "train"), "--output_dir", str(out / "finetune")
            )
    finally:
        os.umask(mask)
    return {"train": out / "train", "finetune": out / "finetune", "warnings": caught, "console": console.getvalue()}


@pytest.mark.parametrize("job", ["train", "finetune"])
def test_every_file_in_the_run_folder_follows_the_umask(runs, job):
    """Under umask 027 every file is created 0640 and every folder 0750, the weights included:
    safetensors writes them through a temporary file made 0600, whatever the umask."""
    weights = {
        "train": ["model.safetensors", "checkpoint-4/model.safetensors"],
        "finetune": ["adapter_model.safetensors"],
    }
    assert all((runs[job] / name).is_file() for name in weights[job])
    modes = {str(p.relative_to(runs[job])): p.stat().st_mode & 0o777 for p in runs[job].rglob("*")}
    wrong = {
        name: oct(mode) for name, mode in modes.items() if mode != (0o750 if (runs[job] / name).is_dir() else 0o640)
    }
    assert wrong == {}


def test_the_console_off_a_terminal_has_no_bars_and_logs_numbers(runs):
    """Captured (not a terminal), the runs' output holds no carriage return or escape code and no
    library progress bar, and each value logged in training is printed as a number: it reads back as
    the float trainer_state.json holds, to the 4 digits shown."""
    text = runs["console"]
    assert "\r" not in text and "\x1b" not in text
    assert "Loading weights" not in text and "Writing model shards" not in text and "it/s]" not in text
    history = json.loads((runs["train"] / "trainer_state.json").read_text())["log_history"]
    for key in ("eval_agreement", "kd_loss", "loss"):
        logged = [entry[key] for entry in history if key in entry]
        shown = re.findall(rf"'{key}': ([^,}}]+)", text)  # the train run's first, then the finetune run's
        assert logged and shown, key
        for printed, value in zip(shown, logged):
            assert float(printed) == pytest.approx(value, rel=1e-3, abs=1e-12), key


def on_a_terminal(argv: list[str]) -> str:
    """What ``python -m distill.cli ARGV`` writes to a terminal (a pseudo-terminal, 120 columns)."""
    main_end, child_end = pty.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", *argv], cwd=ROOT, stdin=child_end,
                            stdout=child_end, stderr=child_end)  # fmt: skip
    os.close(child_end)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child has exited and closed its end
        while chunk := os.read(main_end, 1 << 16):
            chunks.append(chunk)
    os.close(main_end)
    assert proc.wait() == 0
    return b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_a_run_draws_one_bar_the_training_steps(tmp_path):
    """Model loading and saving draw none, and the evaluations (one before training, one in it, one
    after) none: the only bar counts the optimizer steps, and nothing is drawn nested in it (no
    cursor-up escape)."""
    text = on_a_terminal(["train", *TRAIN, "--output_dir", str(tmp_path / "out"), "--eval_steps", "2"])
    states = [line for line in text.replace("\r", "\n").splitlines() if re.search(r"\d+%\|", line)]
    totals = {re.search(r"\| *\d+/(\d+)", line)[1] for line in states}
    assert states and totals == {"4"} and "\x1b[A" not in text
    assert re.search(r"'eval_agreement': \d", text)  # the evaluations are logged, as numbers


def card_of(folder):
    text = (folder / "README.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def table_rows(body: str, heading: str) -> dict[str, list[str]]:
    """The rows of the markdown table under ``## heading``: first cell -> the other cells."""
    section = body.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}


def test_a_tiny_run_and_a_lora_run_raise_no_future_or_deprecation_warning(runs):
    """Such warnings (PEFT reading transformers' deprecated `is_gradient_checkpointing`, once on
    every LoRA run) say nothing the user can act on."""
    noise = [w for w in runs["warnings"] if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert noise == [], [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in noise]


@pytest.mark.parametrize("job", ["train", "finetune"])
def test_the_run_folder_holds_a_model_card_with_hub_metadata(runs, job):
    front, body = card_of(runs[job])
    assert ModelCard.load(runs[job] / "README.md").data.to_dict() == front  # what huggingface_hub reads
    assert front["library_name"] == ("transformers" if job == "train" else "peft")
    assert front["pipeline_tag"] == "text-generation"
    assert {"distill", "generated_from_trainer"} <= set(front["tags"])
    if job == "finetune":
        assert "lora" in front["tags"]
    # Local paths are no hub ids: named in the text, never as base_model or datasets.
    assert "base_model" not in front and "datasets" not in front
    assert body.startswith(f"\n# {job}\n")


def test_the_distillation_card_names_teacher_student_and_data(runs):
    _, body = card_of(runs["train"])
    about = table_rows(body, "Training")
    assert about["teacher"] == [f"`{TEACHER}`"] and about["student"] == [f"`{STUDENT}`"]
    assert about["training data"] == [f"`{DATA / 'corpus_train.jsonl'}`"]
    assert about["held-out data"] == [f"`{DATA / 'corpus_eval.jsonl'}`"]
    assert about["optimizer steps"] == ["4"]


@pytest.mark.parametrize("job", ["train", "finetune"])
def test_the_cards_numbers_are_those_of_metrics_json_and_cost_report_json(runs, job):
    _, body = card_of(runs[job])
    metrics = json.loads((runs[job] / "metrics.json").read_text())
    bill = json.loads((runs[job] / "cost_report.json").read_text())

    held_out = table_rows(body, "Held-out results")
    expected = {"train": ["loss", "kd_loss", "ce_loss", "agreement"], "finetune": ["loss"]}[job]
    assert list(held_out) == expected
    for name, (before, after) in held_out.items():
        assert float(before) == pytest.approx(metrics["eval_before"][f"eval_before_{name}"], abs=5e-5)
        assert float(after) == pytest.approx(metrics["eval"][f"eval_{name}"], abs=5e-5)

    cost = table_rows(body, "What it cost (measured)")
    assert list(cost) == (["teacher", "student", "total"] if job == "train" else ["student", "total"])
    for role, (flops, pflops_days) in cost.items():
        assert int(flops.replace(",", "")) == bill["flops"][role]
        assert float(pflops_days) == pytest.approx(bill["pflops_days"][role], rel=1e-3)
    assert f"{bill['tokens']:,} tokens" in body


@pytest.mark.parametrize("job", ["train", "finetune"])
def test_the_card_quotes_the_resolved_recipe(runs, job):
    _, body = card_of(runs[job])
    quoted = re.search(r"```yaml\n(.*?)```", body, re.S).group(1)
    assert yaml.safe_load(quoted) == yaml.safe_load((runs[job] / "recipe.yaml").read_text())


def test_tensorboard_events_carry_the_losses_agreement_and_cost_as_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run("train", *TRAIN, "--output_dir", str(out), "--report_to", "tensorboard", "--max_steps", "2")
    scalars = {}
    for events in sorted(out.glob("runs/*/events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = {}
    for entry in history:
        for key, value in entry.items():
            if key in ("kd_loss", "ce_loss", "flops_teacher", "flops_student", "flops_total", "pflops_days"):
                logged.setdefault(f"train/{key}", {})[entry["step"]] = value
            elif key in ("eval_kd_loss", "eval_agreement"):
                logged.setdefault(f"eval/{key.removeprefix('eval_')}", {})[entry["step"]] = value
    assert len(logged) == 8
    for tag, values in logged.items():
        assert scalars[tag] == pytest.approx(values, rel=1e-6), tag  # float32 in the event file
