"""Several teachers at once (`teachers:` + `teacher_weights:`): the KD term is sum_i w_i KD_i, each
teacher reads its own batch keys (``name@i``), may have its own tokenizer and source, and has its own
line in the bill. One teacher stays the plain case."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill import train
from distill.cli import main
from distill.config import DistillConfig
from distill.data import Collator, TeachersCollator, keyed, tokenize_pair
from distill.models import load_model, load_tokenizer
from distill.teacher import ModelTeacher
from distill.trainer import DistillTrainer
from distill.xtoken import build_vocab_map

from conftest import DATA, STUDENT, TEACHER, TINY

TEACHER_XTOK = str(TINY / "teacher_xtok")


def recipe(tmp_path, name: str, **changes) -> str:
    values = {
        "model_name_or_path": STUDENT,
        "dataset": str(DATA / "corpus_train.jsonl"), "eval_dataset": str(DATA / "corpus_eval.jsonl"),
        "max_train_samples": 64, "max_eval_samples": 16, "max_length": 64, "per_device_train_batch_size": 8,
        "max_steps": 3, "logging_steps": 3, "save_strategy": "no", "learning_rate": 3e-3, "alpha": 0.7,
        "use_cpu": True, "output_dir": str(tmp_path / name), "report_to": "none", "disable_tqdm": True,
    }  # fmt: skip
    values.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return str(path)


def losses(run_dir) -> list[tuple]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    keys = ("loss", "kd_loss", "ce_loss", "eval_kd_loss", "eval_ce_loss", "eval_agreement")
    return [tuple(h.get(k) for k in keys) for h in history]


@pytest.mark.parametrize(
    "first, second",
    [(TEACHER, STUDENT), (TEACHER_XTOK, TEACHER)],
    ids=["same-tokenizer", "another-tokenizer-first"],
)
def test_two_teachers_weighted_one_and_zero_train_exactly_as_the_first_alone(tmp_path, first, second):
    """Weights (1, 0): the same losses, held-out numbers and trained student as the first teacher alone;
    the first teacher's bill line is what the single run measured, the second's what it costs alone at
    alpha 0 (it runs in evaluation only, which the training bill does not count), and the lines add up
    to the teacher's total."""
    one = train.run(recipe(tmp_path, "one", teacher_model_name_or_path=first))
    two = train.run(recipe(tmp_path, "two", teachers=[first, second], teacher_weights=[1.0, 0.0]))
    assert losses(tmp_path / "two") == losses(tmp_path / "one")
    assert two["eval"]["eval_agreement_teacher_0"] == one["eval"]["eval_agreement"]
    if first == TEACHER_XTOK:  # each teacher's unaligned share is logged under its own name
        history = {
            d: json.loads((tmp_path / d / "trainer_state.json").read_text())["log_history"] for d in ("one", "two")
        }
        shares = [h.get("unaligned_share") for h in history["one"]]
        assert any(shares) and [h.get("unaligned_share_teacher_0") for h in history["two"]] == shares
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    single = json.loads((tmp_path / "one" / "cost_report.json").read_text())
    several = json.loads((tmp_path / "two" / "cost_report.json").read_text())
    lines = several["teachers"]
    assert [t["name"] for t in lines] == [first, second] and [t["weight"] for t in lines] == [1.0, 0.0]
    assert lines[0]["flops"] == single["flops"]["teacher"] > 0
    train.run(recipe(tmp_path, "eval_only", teacher_model_name_or_path=second, alpha=0.0))
    eval_only = json.loads((tmp_path / "eval_only" / "cost_report.json").read_text())["flops"]["teacher"]
    assert lines[1]["flops"] == eval_only == 0  # the bill is training's; it never ran there
    assert several["flops"]["teacher"] == lines[0]["flops"] + lines[1]["flops"]
    assert several["teacher_source"] == "several"


def test_the_loss_of_two_teachers_is_the_weighted_sum_of_each_teachers_loss(tmp_path):
    """On one batch, a same-tokenizer and a cross-tokenizer teacher at weights (0.3, 0.7): loss and KD
    are 0.3 x teacher A's + 0.7 x teacher B's (each computed alone, from its own keys), CE is shared."""
    tok, tok_x = load_tokenizer(STUDENT), load_tokenizer(TEACHER_XTOK)
    with open(DATA / "corpus_train.jsonl") as f:
        rows = [tokenize_pair(json.loads(next(f)), tok, tok_x, 64) for _ in range(6)]
    alone_b = Collator(tok.pad_token_id, teacher_pad_token_id=tok_x.pad_token_id)(rows)
    renamed = [{keyed(k, 1) if k in ("teacher_input_ids", "alignment") else k: v for k, v in r.items()} for r in rows]
    per_teacher = [Collator(tok.pad_token_id), Collator(tok.pad_token_id, teacher_pad_token_id=tok_x.pad_token_id)]
    both = TeachersCollator(Collator(tok.pad_token_id), per_teacher)(renamed)
    assert "teacher_input_ids" not in both and torch.equal(both["alignment@1"], alone_b["alignment"])

    student, teacher_a, teacher_b = load_model(STUDENT), load_model(TEACHER), load_model(TEACHER_XTOK)
    vmap = build_vocab_map(tok, tok_x)

    def args(**kw):
        return DistillConfig(output_dir=str(tmp_path), alpha=0.6, temperature=2.0, use_cpu=True, report_to="none", **kw)

    def distill(trainer, batch):
        out, kds, *_ = trainer._distill(student, batch, None)
        return out, kds

    a, _ = distill(DistillTrainer(student, teacher_a, args(teacher_model_name_or_path=TEACHER)), alone_b)
    b, _ = distill(
        DistillTrainer(student, ModelTeacher(teacher_b, vmap), args(teacher_model_name_or_path=TEACHER_XTOK)),
        alone_b,
    )
    several = DistillTrainer(
        student,
        [teacher_a, ModelTeacher(teacher_b, vmap)],
        args(teachers=[TEACHER, TEACHER_XTOK], teacher_weights=[3.0, 7.0]),  # divided by their sum
    )
    mixed, kds = distill(several, both)
    torch.testing.assert_close(mixed.loss, 0.3 * a.loss + 0.7 * b.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed.kd, 0.3 * a.kd + 0.7 * b.kd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed.ce, a.ce)
    torch.testing.assert_close(torch.stack(kds), torch.stack([a.kd, b.kd]))
    assert not torch.isclose(a.kd, b.kd)  # the two teachers differ, so the weights matter


def test_a_cache_of_weight_zero_is_not_billed_its_build(tmp_path):
    """Training never reads a weight-0 teacher's targets, so a cache at weight 0 bills none of its build
    (as a cache at alpha 0); the model beside it is billed as when alone."""
    cache = tmp_path / "cache"
    assert main(["cache-teacher", recipe(tmp_path, "c", teacher_model_name_or_path=TEACHER), "--teacher_cache",
                 str(cache), "--teacher_top_k", "8"]) == 0  # fmt: skip
    train.run(recipe(tmp_path, "two", teachers=[str(cache), STUDENT], teacher_weights=[0.0, 1.0], teacher_top_k=8))
    train.run(recipe(tmp_path, "one", teacher_model_name_or_path=STUDENT, teacher_top_k=8))
    train.run(recipe(tmp_path, "alpha0", teacher_cache=str(cache), teacher_top_k=8, alpha=0.0))
    report, one, alpha0 = (
        json.loads((tmp_path / d / "cost_report.json").read_text()) for d in ("two", "one", "alpha0")
    )
    cached, model = report["teachers"]
    assert cached["flops"] == alpha0["flops"]["teacher"]
    assert model["flops"] == one["flops"]["teacher"] > 0
    assert losses(tmp_path / "two") == losses(tmp_path / "one")


def test_a_cache_and_a_model_train_together_each_billed_its_way(tmp_path):
    """A cache (`distill cache-teacher`) among the teachers: its line is its share of the build, the
    model's its measured forwards."""
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "cache-teacher",
                recipe(tmp_path, "c", teacher_model_name_or_path=TEACHER),
                "--teacher_cache",
                str(cache),
                "--teacher_top_k",
                "8",
            ]
        )  # fmt: skip
        == 0
    )
    metrics = train.run(
        recipe(tmp_path, "two", teachers=[str(cache), STUDENT], teacher_weights=[0.5, 0.5], teacher_top_k=8)
    )
    assert metrics["eval"]["eval_kd_loss"] > 0
    report = json.loads((tmp_path / "two" / "cost_report.json").read_text())
    cached, model = report["teachers"]
    built = json.loads((cache / "manifest.json").read_text())["teacher_cost"]["train"]
    assert cached["source"] == "cache" and cached["flops"] == round(built["flops"] * cached["cache_share"])
    assert model["source"] == "model" and model["flops"] > 0
    assert report["flops"]["teacher"] == cached["flops"] + model["flops"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"teachers": [TEACHER, STUDENT], "teacher_weights": [1.0]}, "teacher_weights has 1 weight(s) for 2 teachers"),
        ({"teachers": [TEACHER, STUDENT], "teacher_weights": [1.0, -1.0]}, "teacher_weights must be >= 0"),
        ({"teachers": [TEACHER, STUDENT], "teacher_weights": [0.0, 0.0]}, "with a sum > 0"),
        ({"teacher_weights": [1.0]}, "teacher_weights is set but teachers is not"),
        (
            {"teachers": [TEACHER], "teacher_model_name_or_path": TEACHER},
            "teachers and teacher_model_name_or_path are both set",
        ),
        ({"teachers": [TEACHER, "http://127.0.0.1:1"], "temperature": 2.0}, "log-probabilities at temperature 1 only"),
        ({"teachers": [TEACHER, "http://127.0.0.1:1"]}, "does not answer"),
        ({"teachers": [TEACHER, STUDENT], "hidden_loss_weight": 1.0}, "pairs the student's layers with one teacher"),
    ],  # fmt: skip
)
def test_bad_teacher_lists_are_one_line_before_anything_loads(tmp_path, monkeypatch, capsys, changes, message):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(train, "load_tokenizer", lambda *a, **k: pytest.fail("a tokenizer loaded"))
    assert main(["train", recipe(tmp_path, "bad", **changes)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_missing_teacher_among_several_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(train.adapters, "load_student", lambda *a, **k: pytest.fail("a model loaded"))
    assert main(["train", recipe(tmp_path, "bad", teachers=[TEACHER, str(tmp_path / "nowhere")])]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_a_resumed_run_of_several_teachers_bills_each_as_the_uninterrupted_one(tmp_path):
    """Each teacher's line is checkpointed: stopping after step 2 and resuming gives the same per-teacher
    FLOPs as running straight through (the cross-tokenizer teacher's output layer, which runs on the
    aligned rows only, is billed per row, not per batch shape)."""
    path = recipe(tmp_path, "run", teachers=[TEACHER, TEACHER_XTOK], max_steps=4, save_strategy="steps", save_steps=2)
    train.run(path)
    straight = json.loads((tmp_path / "run" / "cost_report.json").read_text())
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    (tmp_path / "run" / "cost_report.json").unlink()
    train.run(
        path, ["--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-2"), "--overwrite_output_dir", "true"]
    )
    resumed = json.loads((tmp_path / "run" / "cost_report.json").read_text())
    assert resumed["tokens"] == straight["tokens"]
    assert [t["flops"] for t in resumed["teachers"]] == [t["flops"] for t in straight["teachers"]]
    assert all(t["flops"] > 0 for t in straight["teachers"])


def test_a_cache_across_tokenizers_among_several_at_weight_one_trains_as_it_does_alone(tmp_path):
    """A cache in the teacher's token space (its teacher's tokenizer is not the student's) listed first at
    weight 1: the losses and student of training from that cache alone, and its bill line is that run's."""
    cache = tmp_path / "cache"
    built = recipe(tmp_path, "c", teacher_model_name_or_path=TEACHER_XTOK)
    assert main(["cache-teacher", built, "--teacher_cache", str(cache), "--teacher_top_k", "8"]) == 0
    train.run(recipe(tmp_path, "one", teacher_cache=str(cache), teacher_top_k=8))
    train.run(recipe(tmp_path, "two", teachers=[str(cache), TEACHER], teacher_weights=[1.0, 0.0], teacher_top_k=8))
    assert losses(tmp_path / "two") == losses(tmp_path / "one")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    one, two = (json.loads((tmp_path / d / "cost_report.json").read_text()) for d in ("one", "two"))
    assert two["teachers"][0]["source"] == "cache" and two["teachers"][0]["flops"] == one["flops"]["teacher"] > 0


def test_on_policy_with_two_teachers_weighted_one_and_zero_is_the_first_teacher_alone(tmp_path):
    """The student's own samples graded by several teachers: at weights (1, 0) the same samples, losses,
    sampled reverse KL and student as with the first teacher alone."""
    on_policy = {
        "dataset": str(DATA / "domain_train.jsonl"), "eval_dataset": str(DATA / "domain_eval.jsonl"), "lmbda": 1.0,
        "max_new_tokens": 8, "alpha": 1.0, "loss_type": "reverse_kl", "logging_steps": 1,
    }  # fmt: skip
    train.run(recipe(tmp_path, "one", teacher_model_name_or_path=TEACHER, **on_policy))
    train.run(recipe(tmp_path, "two", teachers=[TEACHER, STUDENT], teacher_weights=[1.0, 0.0], **on_policy))
    history = {d: json.loads((tmp_path / d / "trainer_state.json").read_text())["log_history"] for d in ("one", "two")}
    keys = ("loss", "kd_loss", "sampled_length", "sampled_reverse_kl")
    assert [[h.get(k) for k in keys] for h in history["two"]] == [[h.get(k) for k in keys] for h in history["one"]]
    assert any(h.get("sampled_reverse_kl") for h in history["one"])
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert all(torch.equal(a[k], b[k]) for k in a)
