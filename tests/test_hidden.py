"""Specifications of the hidden-state term (distill.hidden) and of the prune bill a run carries."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from distill import train
from distill.config import DataArguments, DistillConfig
from distill.cost import render_report
from distill.data import Collator, build_datasets
from distill.errors import UserError
from distill.hidden import HiddenStateLoss, captured_layers, hidden_state_loss, layer_pairs, parse_layer_map
from distill.models import load_model
from distill.trainer import HIDDEN_LOSS_FILE, DistillTrainer

from conftest import DATA, STUDENT, TEACHER, StopAt

# --- the loss --------------------------------------------------------------------------------------


def reference(student, teacher, labels, loss_type, weight, denom):
    """The module docstring's formula, one token at a time in float64."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        for b in range(labels.shape[0]):
            for i in range(labels.shape[1] - 1):
                if labels[b, i + 1] == -100:
                    continue
                a = s[b, i].double() @ weight.double().T if weight is not None else s[b, i].double()
                c = t[b, i].double()
                total += ((a - c) ** 2).mean() if loss_type == "mse" else 1 - a @ c / (a.norm() * c.norm())
    return total / (len(student) * denom)


def states(batch=3, seq=7, width=8, pairs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, width, generator=g) for _ in range(pairs)]


@pytest.fixture
def labels():
    labels = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return labels


@pytest.mark.parametrize("loss_type", ["mse", "cosine"])
def test_the_loss_matches_a_float64_reference_with_and_without_a_projection(loss_type, labels):
    student, teacher = states(width=5), states(width=8, seed=2)
    term = HiddenStateLoss([(0, 1), (1, 3)], 5, 8, loss_type)
    got = term(student, teacher, labels, num_items_in_batch=40).detach()
    want = reference(student, teacher, labels, loss_type, term.projection.weight.detach(), 40)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    same = states(width=8, seed=3)
    got = hidden_state_loss(same, teacher, labels, loss_type)
    tokens = int(labels[:, 1:].ne(-100).sum())
    assert float(got) == pytest.approx(float(reference(same, teacher, labels, loss_type, None, tokens)), rel=1e-5)


@pytest.mark.parametrize("loss_type", ["mse", "cosine"])
def test_identical_states_give_zero_and_padding_changes_nothing(loss_type, labels):
    student = states()
    assert float(hidden_state_loss(student, [s.clone() for s in student], labels, loss_type)) == pytest.approx(
        0.0, abs=1e-6
    )
    teacher = states(seed=5)
    base = hidden_state_loss(student, teacher, labels, loss_type)
    # Garbage at every non-target position (the state at t is read when label t + 1 is a target).
    off = torch.cat([labels[:, 1:].eq(-100), torch.ones(3, 1, dtype=torch.bool)], 1)[..., None]
    noisy = [torch.where(off, 1e3 * torch.randn_like(s), s) for s in student]
    assert torch.equal(hidden_state_loss(noisy, teacher, labels, loss_type), base)


def test_micro_batches_sum_to_the_whole_batch_with_the_steps_token_count(labels):
    student, teacher = states(), states(seed=4)
    tokens = int(labels[:, 1:].ne(-100).sum())
    whole = hidden_state_loss(student, teacher, labels)
    parts = sum(
        hidden_state_loss(
            [s[rows] for s in student], [t[rows] for t in teacher], labels[rows], num_items_in_batch=tokens
        )
        for rows in (slice(0, 1), slice(1, 3))
    )
    torch.testing.assert_close(parts, whole)


def test_a_projection_from_kept_channels_puts_the_student_where_the_teacher_has_those_channels(labels):
    kept = [6, 0, 3, 1]
    teacher = states(width=8)
    for t in teacher:  # a teacher whose pruned channels are silent
        t[..., [c for c in range(8) if c not in kept]] = 0
    student = [t[..., kept] for t in teacher]
    term = HiddenStateLoss([(0, 0), (1, 1)], 4, 8, "mse", kept=kept)
    assert term(student, teacher, labels).item() == 0.0
    # without a report: orthonormal columns, which keep a state's norm
    w = HiddenStateLoss([(0, 0)], 4, 8).projection.weight.detach()
    torch.testing.assert_close(w.T @ w, torch.eye(4))


def test_captured_layers_are_the_models_own_hidden_states():
    model = load_model(TEACHER)
    ids = torch.randint(3, 900, (2, 9))
    with torch.no_grad(), captured_layers(model, [3, 1]) as captured:
        out = model(input_ids=ids, output_hidden_states=True)
    # hidden_states[i + 1] is layer i's output, except the last, which transformers gives after the final norm.
    torch.testing.assert_close(captured[1], out.hidden_states[2])
    assert captured[0].shape == out.hidden_states[4].shape
    torch.testing.assert_close(model.model.norm(captured[0]), out.hidden_states[4])


# --- what a user can get wrong ---------------------------------------------------------------------


def test_a_layer_map_naming_missing_layers_or_badly_written_is_one_clear_error(tmp_path):
    assert parse_layer_map("0:0, 1:5,2:11") == [(0, 0), (1, 5), (2, 11)]
    with pytest.raises(UserError, match="student_layer:teacher_layer"):
        parse_layer_map("0-0")
    with pytest.raises(UserError, match="does not exist"):
        layer_pairs("0:0,1:4", tmp_path, 2, 4)
    with pytest.raises(UserError, match="twice"):
        layer_pairs("0:0,0:1", tmp_path, 2, 4)
    with pytest.raises(UserError, match="no prune_report.json"):
        layer_pairs(None, tmp_path, 2, 4)


@pytest.mark.parametrize("source", [{"teacher_cache": "/nowhere"}, {"teacher_server": "http://127.0.0.1:1"}])
def test_a_source_without_hidden_states_is_refused_in_the_recipe(tmp_path, source):
    with pytest.raises(UserError, match="hidden states"):
        DistillConfig(output_dir=str(tmp_path), teacher_model_name_or_path=TEACHER, hidden_loss_weight=1.0, **source)
    with pytest.raises(UserError, match="hidden_loss_type"):
        DistillConfig(output_dir=str(tmp_path), teacher_model_name_or_path=TEACHER, hidden_loss_type="l1")


def test_the_train_job_refuses_a_layer_map_past_the_teacher_before_loading_weights(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: {STUDENT}\nteacher_model_name_or_path: {TEACHER}\ndataset: {DATA / 'corpus_train.jsonl'}\n"
        f"hidden_loss_weight: 1.0\nhidden_layer_map: '0:0,1:9'\nuse_cpu: true\noutput_dir: {tmp_path / 'out'}\n"
    )
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(UserError, match=r"1:9 names a layer that does not exist"):
        train.run(str(recipe))


# --- in the trainer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tokenizer):
    args = DataArguments(
        dataset=str(DATA / "corpus_train.jsonl"), eval_dataset=str(DATA / "corpus_eval.jsonl"), max_length=32,
        max_train_samples=64, max_eval_samples=16,
    )  # fmt: skip
    return build_datasets(args, tokenizer)


COST = {
    "flops": {"importance": 3_000_000_000, "perplexity": 1_000_000_000, "total": 4_000_000_000},
    "pflops_days": {"total": 4e9 / 8.64e19},
    "wall_seconds": {"total": 12.5},
    "measured": "model FLOPs counted by torch.utils.flop_counter (distill.flops.FlopMeter)",
}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A copy of the tiny student with the prune_report.json `distill prune` would have written."""
    folder = tmp_path_factory.mktemp("pruned") / "student"
    shutil.copytree(STUDENT, folder)
    report = {"layer_map": [1, 3], "kept": {"hidden_size": list(range(0, 128, 2))}, "cost": COST}
    (folder / "prune_report.json").write_text(json.dumps(report))
    return str(folder)


def run(tmp_path, name, data, tokenizer, student, stop=None, resume=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / name), teacher_model_name_or_path=TEACHER, max_steps=4,
        per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=2, eval_strategy="steps", eval_steps=4,
        save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        hidden_loss_weight=1.0,
    )  # fmt: skip
    values.update(overrides)
    trainer = DistillTrainer(
        model=load_model(student), teacher=load_model(TEACHER), args=DistillConfig(**values),
        train_dataset=data[0], eval_dataset=data[1], processing_class=tokenizer,
        data_collator=Collator(tokenizer.pad_token_id),
    )  # fmt: skip
    if stop:
        trainer.add_callback(StopAt(stop))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_the_hidden_term_trains_logs_and_stays_out_of_the_saved_student(tmp_path, data, tokenizer):
    teacher_forwards = []
    trainer = run(tmp_path, "hidden", data, tokenizer, STUDENT, hidden_layer_map="0:1,1:3", save_strategy="no")
    assert trainer.hidden_loss.student_layers == [0, 1] and trainer.hidden_loss.teacher_layers == [1, 3]
    history = trainer.state.log_history
    hidden = [h["hidden_loss"] for h in history if "hidden_loss" in h]
    assert len(hidden) == 2 and all(v > 0 for v in hidden)
    assert any("eval_hidden_loss" in h for h in history)
    logged = next(h for h in history if "hidden_loss" in h)
    # the logged loss is the weighted sum of the terms (alpha 0.5, weight 1)
    assert logged["loss"] == pytest.approx(0.5 * logged["kd_loss"] + 0.5 * logged["ce_loss"] + hidden[0], rel=1e-4)
    assert trainer.hidden_loss.projection.weight.shape == (128, 64)

    # the teacher runs once per micro-batch, as without the term
    trainer.teacher.model.register_forward_hook(lambda *a: teacher_forwards.append(1))
    trainer.evaluate()
    assert len(teacher_forwards) == len(trainer.get_eval_dataloader())

    trainer.save_model(str(tmp_path / "saved"))
    plain = run(tmp_path, "plain", data, tokenizer, STUDENT, hidden_loss_weight=0.0, save_strategy="no")
    plain.save_model(str(tmp_path / "plain_saved"))
    keys = {}
    for name in ("saved", "plain_saved"):
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            keys[name] = set(f.keys())
    assert keys["saved"] == keys["plain_saved"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / HIDDEN_LOSS_FILE).exists()


def test_a_resumed_run_ends_with_the_projection_and_bill_of_an_uninterrupted_one(tmp_path, data, tokenizer, pruned):
    """The student folder's prune_report.json gives the layer map, the projection's start (its kept
    channels) and the prune bill; all three survive a resume."""
    whole = run(tmp_path, "whole", data, tokenizer, pruned)
    start = HiddenStateLoss([(0, 1)], 64, 128, kept=list(range(0, 128, 2))).projection.weight
    assert whole.hidden_loss.pairs == [(0, 1), (1, 3)]
    assert not torch.equal(whole.hidden_loss.projection.weight.detach(), start)  # it trained
    run(tmp_path, "resumed", data, tokenizer, pruned, stop=2)
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / HIDDEN_LOSS_FILE).is_file()
    resumed = run(tmp_path, "resumed", data, tokenizer, pruned, resume=str(checkpoint))
    torch.testing.assert_close(resumed.hidden_loss.projection.weight, whole.hidden_loss.projection.weight)

    for trainer in (whole, resumed):
        bill = json.loads((tmp_path / trainer.args.output_dir / "cost_report.json").read_text())
        flops = bill["flops"]
        assert flops["prune"] == COST["flops"]["total"]
        assert flops["total"] == flops["teacher"] + flops["student"] + flops["student_generation"] + flops["prune"]
        assert bill["pflops_days"]["total"] == pytest.approx(flops["total"] / 8.64e19)
        assert bill["prune"]["wall_seconds"] == 12.5 and "distill prune" in bill["prune"]["note"]
        assert "  prune " in render_report(bill)
    # what the checkpoints carry, so that a resumed run keeps it
    assert resumed.cost.state()["args"]["prune"] == COST


def test_a_run_from_a_student_without_a_prune_report_has_no_prune_entry(tmp_path, data, tokenizer):
    trainer = run(tmp_path, "unpruned", data, tokenizer, STUDENT, hidden_loss_weight=0.0, max_steps=1,
                  save_strategy="no", eval_strategy="no")  # fmt: skip
    bill = json.loads((tmp_path / "unpruned" / "cost_report.json").read_text())
    assert "prune" not in bill and "prune" not in bill["flops"] and trainer.hidden_loss is None
