"""`alpha: 0` is plain supervised training: in training the teacher neither runs nor is billed, and
no kd_loss is logged; at evaluation it still runs, for agreement and the held-out KL."""

import pytest
import torch
from transformers import default_data_collator

from distill.config import DistillConfig
from distill.models import load_model
from distill.train import summary
from distill.trainer import DistillTrainer

from conftest import STUDENT, TEACHER


def rows(n=12, length=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, 200, (length,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 5] = -100  # a prompt of varying length: batches differ in target counts
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(length, dtype=torch.long)})
    return out


def trainer_for(tmp_path, chunked, **overrides):
    args = DistillConfig(
        output_dir=str(tmp_path / "out"),
        teacher_model_name_or_path=TEACHER,
        alpha=0.0,
        temperature=2.0,
        loss_type="reverse_kl",  # any divergence: with alpha 0 it has no weight
        chunked_loss=chunked,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        **overrides,
    )
    data = rows()
    trainer = DistillTrainer(
        model=load_model(STUDENT),
        teacher=load_model(TEACHER),
        args=args,
        train_dataset=data,
        eval_dataset=data[:4],
        data_collator=default_data_collator,
    )
    assert trainer._chunked == chunked
    return trainer


def spy_on_teacher(trainer, monkeypatch) -> list:
    """Whether the student was training at each call of the teacher's forward."""
    calls, forward = [], trainer.teacher.model.forward

    def spy(*args, **kwargs):
        calls.append(trainer.model.training)
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer.teacher.model, "forward", spy)
    return calls


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "reference"])
def test_a_training_step_runs_no_teacher_and_its_loss_and_gradients_are_plain_cross_entropy(
    tmp_path, monkeypatch, chunked
):
    trainer = trainer_for(tmp_path, chunked, measure_cost=False)
    calls = spy_on_teacher(trainer, monkeypatch)
    model = trainer.model.train()
    batch = default_data_collator(rows()[:4])

    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = model(**batch).loss  # the model's own cross-entropy: mean over the shifted target tokens
    plain.backward()

    assert calls == []
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_teacher_runs_only_at_evaluation_is_billed_nothing_and_no_kd_loss_is_logged(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, chunked=True)
    calls = spy_on_teacher(trainer, monkeypatch)
    trainer.train()
    trained_calls = len(calls)
    metrics = trainer.evaluate()

    assert trained_calls == 0 and calls and not any(calls)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3 and all("ce_loss" in h and "kd_loss" not in h for h in train_logs)
    assert 0 <= metrics["eval_agreement"] <= 1 and metrics["eval_kd_loss"] > 0
    report = trainer.cost.report()
    assert report["flops"]["teacher"] == 0 < report["flops"]["student"] == report["flops"]["total"]
    assert all(h["flops_teacher"] == 0 for h in train_logs)
    done = summary(trainer, {"global_step": 3, "eval": {}, "eval_before": {}}, str(tmp_path / "out"))
    assert "final kd_loss    n/a (alpha 0: the teacher does not run in training)" in done
