"""Specifications of the `distill finetune` job on the repo's tiny student and domain data."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill import finetune
from distill.config import DataArguments
from distill.data import Collator, build_datasets
from distill.flops import model_size
from distill.models import load_model, load_tokenizer
from distill.planner import training_flops

from conftest import DATA, ROOT, STUDENT, TEACHER

DOMAIN = {"dataset": DATA / "domain_train.jsonl", "eval_dataset": DATA / "domain_eval.jsonl"}
CHAT = {"dataset": DATA / "chat_train.jsonl", "eval_dataset": None, "eval_fraction": 0.2}


def write_recipe(path, **changes):
    values = {
        "model_name_or_path": STUDENT, **DOMAIN, "use_peft": True, "lora_r": 8, "lora_alpha": 16,
        "max_length": 64, "max_steps": 20, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
        "learning_rate": 1e-2, "logging_steps": 10, "save_strategy": "'no'", "use_cpu": True, "seed": 0,
        "disable_tqdm": True, "output_dir": path.parent / "out",
    }  # fmt: skip
    values.update(changes)
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items() if v is not None))
    return str(path)


RUNS = {
    "lora-prompt-completion": {},
    "full-prompt-completion": {"use_peft": False, "learning_rate": 3e-3},
    "lora-chat": CHAT,
}


@pytest.fixture(scope="module", params=RUNS)
def run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    metrics = finetune.run(write_recipe(tmp / "recipe.yaml", **RUNS[request.param]))
    return request.param, metrics, tmp / "out"


def test_fine_tuning_lowers_the_held_out_loss_on_the_domain(run):
    _, metrics, _ = run
    assert metrics["eval"]["eval_loss"] < metrics["eval_before"]["eval_before_loss"] - 0.25
    assert metrics["global_step"] > 0


def test_the_job_writes_the_model_or_adapter_the_recipe_the_metrics_and_the_cost(run):
    name, metrics, out = run
    if name.startswith("lora"):
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        assert not (out / "model.safetensors").exists()
    else:
        assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert (out / "tokenizer.json").is_file()
    assert "use_peft" in (out / "recipe.yaml").read_text()
    assert json.loads((out / "metrics.json").read_text())["global_step"] == metrics["global_step"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == metrics["global_step"]
    cost = json.loads((out / "cost_report.json").read_text())
    assert cost["flops"]["student"] > 0 and cost["flops"]["teacher"] == 0
    assert cost["flops"]["total"] == cost["flops"]["student"]


def test_the_before_evaluation_is_the_step_0_evaluation_of_the_log(run):
    """eval_on_start: the "before" numbers are those logged at step 0, inside train()."""
    _, metrics, out = run
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[0]["step"] == 0 and history[0]["eval_loss"] == metrics["eval_before"]["eval_before_loss"]


def test_the_measured_flops_of_a_full_fine_tuning_step_are_the_analytic_count(tmp_path):
    """One step of 16 padded rows: forward + backward = 3 x (2N + 4Lsd) FLOPs per position (distill.cost)."""
    finetune.run(write_recipe(tmp_path / "r.yaml", use_peft=False, max_steps=1))
    report = json.loads((tmp_path / "out" / "cost_report.json").read_text())
    tokens = report["tokens"]
    assert tokens % 16 == 0
    analytic = training_flops(model_size(str(STUDENT)), tokens, seq_len=tokens // 16)
    assert report["flops"]["student"] == pytest.approx(analytic["student"], rel=1e-6)


def test_the_summary_is_printed_at_the_end(tmp_path, capsys):
    metrics = finetune.run(write_recipe(tmp_path / "r.yaml", max_steps=2))
    out = capsys.readouterr().out
    assert "trainable parameters:" in out and "%)" in out
    assert "distill finetune: done" in out and "steps            2" in out
    before, after = metrics["eval_before"]["eval_before_loss"], metrics["eval"]["eval_loss"]
    assert f"held-out loss    before {before:.4f}  after {after:.4f}" in out
    assert "distill: cost (measured)" in out
    assert "adapter saved to" in out and "distill merge" in out


def test_the_held_out_loss_is_cross_entropy_on_completion_tokens_only(tmp_path):
    """eval_before_loss (one batch of all held-out rows) against a float64 reference over the completion
    tokens. The trained tiny teacher stands in for the model, so that the loss over every token (prompts
    included) is measurably different."""
    metrics = finetune.run(write_recipe(tmp_path / "r.yaml", model_name_or_path=TEACHER, max_steps=1))
    tokenizer = load_tokenizer(TEACHER)
    rows = build_datasets(DataArguments(dataset=str(DOMAIN["eval_dataset"]), eval_fraction=0.0), tokenizer)[0]
    assert len(rows) <= 64  # one evaluation batch, so the Trainer's batch mean is the token mean
    batch = Collator(tokenizer.pad_token_id)(list(rows))
    with torch.no_grad():
        logits = load_model(TEACHER)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)

    def mean_ce(targets, mask):
        nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (nll[mask].sum() / mask.sum()).item()

    labels = batch["labels"][:, 1:]
    completion = mean_ce(labels, labels != -100)
    every_token = mean_ce(batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:] == 1)
    assert metrics["eval_before"]["eval_before_loss"] == pytest.approx(completion, rel=1e-5)
    assert abs(every_token - completion) > 0.1


def test_scripts_finetune_runs_the_finetune_command_from_anywhere(tmp_path):
    """Run as a file from another directory, so Python puts scripts/ first on the path (where distill.py
    would shadow the package). Without a recipe it stops in argument parsing, before the heavy imports."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "finetune.py")], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "finetune needs a recipe file: distill finetune RECIPE.yaml" in done.stderr
