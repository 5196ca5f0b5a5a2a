"""What a `distill train` / `distill finetune` run leaves and says: a model card that a hub takes as it
is, TensorBoard events that carry distill's own metrics, and no warning the user cannot act on."""

import json
import re
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
    """A plain tiny `distill train` (the shape of recipes/tiny_cpu.yaml), then LoRA `distill finetune`
    of its student (recipes/tiny_cpu_finetune.yaml), each for a few steps."""
    out = tmp_path_factory.mktemp("runs")
    caught = run("train", *TRAIN, "--output_dir", str(out / "train"))
    caught += run(
        "finetune", *FINETUNE, "--model_name_or_path", str(out / "train"), "--output_dir", str(out / "finetune")
    )
    return {"train": out / "train", "finetune": out / "finetune", "warnings": caught}


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
