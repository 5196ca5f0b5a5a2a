"""`distill train` with a teacher whose tokenizer differs from the student's (distill.xtoken): the
live teacher runs on its own tokenisation, positions are aligned by byte offsets, and the loss reads
the teacher's top-k through the run's vocabulary map (`CrossTopK`, distill.teacher)."""

from __future__ import annotations

import json

import pytest
import torch

from distill import train
from distill.config import DistillConfig
from distill.data import Collator, tokenize_pair
from distill.errors import UserError
from distill.models import load_model, load_tokenizer
from distill.teacher import ModelTeacher
from distill.trainer import DistillTrainer
from distill.xtoken import build_vocab_map

from conftest import DATA, STUDENT, TEACHER, TINY, SlowTokenizer

TEACHER_XTOK = str(TINY / "teacher_xtok")


def rows(n: int) -> list[dict]:
    with open(DATA / "corpus_train.jsonl") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.mark.parametrize("chunked_loss", [True, False])
def test_identical_tokenizers_through_the_cross_tokenizer_path_give_the_same_tokenizer_loss(tmp_path, chunked_loss):
    """The same teacher and tokenizer, once as a plain teacher and once forced through the cross-tokenizer
    path (identity map and alignment, k = the whole vocabulary): the same loss, KD and CE terms in the
    trainer (1e-6), and the same held-out agreement counts."""
    tok = load_tokenizer(STUDENT)
    batch = Collator(tok.pad_token_id, teacher_pad_token_id=tok.pad_token_id)(
        [tokenize_pair(r, tok, tok, 64) for r in rows(6)]
    )
    assert batch["alignment"].ge(0).any() and torch.equal(batch["teacher_input_ids"], batch["input_ids"])
    student, teacher = load_model(STUDENT), load_model(TEACHER)
    args = DistillConfig(
        output_dir=str(tmp_path), teacher_model_name_or_path=TEACHER, alpha=0.5, temperature=2.0, use_cpu=True,
        report_to="none", chunked_loss=chunked_loss,
    )  # fmt: skip
    cross_teacher = ModelTeacher(teacher, build_vocab_map(tok, tok), "projected", top_k=len(tok))
    results = []
    for source in (teacher, cross_teacher):
        trainer = DistillTrainer(model=student, teacher=source, args=args, processing_class=tok)
        for training in (True, False):
            student.train(training)
            out, _, _, agreement, *_ = trainer._distill(student, batch, None)
            results.append((out, agreement[0] if agreement else None))  # the one teacher's
    for (same, same_agree), (cross, cross_agree) in zip(results[:2], results[2:]):
        for name in ("loss", "kd", "ce"):
            torch.testing.assert_close(getattr(cross, name), getattr(same, name), atol=1e-6, rtol=1e-6)
        if same_agree is not None:  # evaluation: (matches, target tokens)
            assert [int(x) for x in cross_agree] == [int(x) for x in same_agree]
    assert results[1][1] is not None and int(results[1][1][1]) > 0


def test_the_collator_pads_the_teacher_side_with_its_pad_id_and_the_alignment_with_minus_one():
    student, teacher = load_tokenizer(STUDENT), load_tokenizer(TEACHER_XTOK)
    pairs = [tokenize_pair(r, student, teacher, 64) for r in rows(3)]
    batch = Collator(student.pad_token_id, teacher_pad_token_id=teacher.pad_token_id)(pairs)
    for i, p in enumerate(pairs):
        n, n_t = len(p["input_ids"]), len(p["teacher_input_ids"])
        assert batch["teacher_input_ids"][i, :n_t].tolist() == p["teacher_input_ids"]
        assert batch["teacher_input_ids"][i, n_t:].eq(teacher.pad_token_id).all()
        assert batch["teacher_attention_mask"][i].sum() == n_t
        assert batch["alignment"][i, :n].tolist() == p["alignment"] and batch["alignment"][i, n:].eq(-1).all()
    assert batch["alignment"].shape == batch["input_ids"].shape


def recipe(tmp_path, **changes) -> str:
    values = {
        "model_name_or_path": STUDENT, "teacher_model_name_or_path": TEACHER_XTOK,
        "dataset": str(DATA / "corpus_train.jsonl"), "eval_dataset": str(DATA / "corpus_eval.jsonl"),
        "max_train_samples": 128, "max_eval_samples": 24, "max_length": 64, "per_device_train_batch_size": 8,
        "max_steps": 8, "save_steps": 4, "logging_steps": 4, "learning_rate": 3e-3, "alpha": 0.9,
        "use_cpu": True, "output_dir": str(tmp_path / "out"), "report_to": "none", "disable_tqdm": True,
    }  # fmt: skip
    values.update(changes)
    path = tmp_path / "r.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return str(path)


def test_distill_train_with_another_tokenizer_runs_saves_its_map_reports_unaligned_targets_and_resumes(
    tmp_path, capsys
):
    path = recipe(tmp_path)
    metrics = train.run(path)
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    # The map is saved beside the run; the unaligned share is logged like kd_loss and in the summary.
    assert (out / "vocab_map.safetensors").is_file()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    shares = [h["unaligned_share"] for h in history if "unaligned_share" in h]
    assert len(shares) == 2 and all(0 < s < 0.1 for s in shares)  # the bos position of each row, on this data
    cross = metrics["cross_tokenizer"]["train"]
    assert cross["unaligned_targets"] == 128 and "unaligned targets (train)" in printed
    # The student moved toward the teacher on held-out text.
    assert metrics["eval"]["eval_kd_loss"] < metrics["eval_before"]["eval_before_kd_loss"]
    assert metrics["eval"]["eval_agreement"] > metrics["eval_before"]["eval_before_agreement"]
    # A resume reads the saved map back and continues.
    mtime = (out / "vocab_map.safetensors").stat().st_mtime_ns
    resumed = train.run(path, ["--max_steps", "10", "--resume_from_checkpoint", "true"])
    assert resumed["global_step"] == 10 and (out / "vocab_map.safetensors").stat().st_mtime_ns == mtime


def test_a_saved_map_of_another_pair_is_refused_before_models_load(tmp_path, monkeypatch):
    student, teacher = load_tokenizer(STUDENT), load_tokenizer(TEACHER_XTOK)
    (tmp_path / "out").mkdir()
    build_vocab_map(teacher, student).save(tmp_path / "out" / "vocab_map.safetensors")  # sides swapped
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(train.adapters, "load_student", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(UserError, match="vocabulary map for another student tokenizer"):
        train.run(recipe(tmp_path))


@pytest.mark.parametrize("bad", ["slow teacher tokenizer", "no teacher chat template", "on-policy"])
def test_bad_cross_tokenizer_input_is_one_clear_error_before_models_load(tmp_path, monkeypatch, bad):
    real = train.load_tokenizer
    changes, needle = {}, ""
    if bad == "slow teacher tokenizer":
        monkeypatch.setattr(
            train, "load_tokenizer", lambda name: SlowTokenizer(real(name)) if name == TEACHER_XTOK else real(name)
        )
        needle = "not a fast tokenizer"
    elif bad == "no teacher chat template":

        def no_template(name):
            tok = real(name)
            if name == TEACHER_XTOK:
                tok.chat_template = None
            return tok

        monkeypatch.setattr(train, "load_tokenizer", no_template)
        changes, needle = {"dataset": str(DATA / "chat_train.jsonl"), "eval_dataset": None}, "no chat template"
    else:
        changes = {"dataset": str(DATA / "domain_train.jsonl"), "eval_dataset": None, "lmbda": 0.5}
        needle = "re-tokenised for the teacher"
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(train.adapters, "load_student", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(UserError, match=needle):
        train.run(recipe(tmp_path, **changes))


@pytest.mark.parametrize("method", ["projected", "uld", "hybrid"])
@pytest.mark.parametrize("loss_type", ["forward_kl", "jsd"])
def test_the_chunked_cross_tokenizer_loss_is_the_reference_loss_with_its_gradients(method, loss_type):
    """From hidden states a few rows at a time (`chunked_xtoken_distillation_loss`) against the
    reference through the whole logits: the same loss, KD, CE and gradients of h_S and W_S."""
    from distill.chunked import chunked_xtoken_distillation_loss
    from distill.losses import teacher_topk, xtoken_distillation_loss

    student, teacher = load_tokenizer(STUDENT), load_tokenizer(TEACHER_XTOK)
    batch = Collator(student.pad_token_id, teacher_pad_token_id=teacher.pad_token_id)(
        [tokenize_pair(r, student, teacher, 64) for r in rows(4)]
    )
    vocab_map = build_vocab_map(student, teacher)
    g = torch.Generator().manual_seed(0)
    b, n, n_t = *batch["input_ids"].shape, batch["teacher_input_ids"].shape[1]
    targets = teacher_topk(torch.randn(b, n_t, len(teacher), generator=g) * 3, 16, temperature=2.0)
    hidden = torch.randn(b, n, 32, generator=g, requires_grad=True)
    weight = (torch.randn(len(student) + 7, 32, generator=g) * 0.3).requires_grad_()  # a padded head
    kw = {"method": method, "alpha": 0.7, "temperature": 2.0, "loss_type": loss_type, "beta": 0.3}
    ref = xtoken_distillation_loss(hidden @ weight.T, targets, batch["alignment"], batch["labels"], vocab_map, **kw)
    ref_grads = torch.autograd.grad(ref.loss, [hidden, weight])
    out = chunked_xtoken_distillation_loss(
        hidden, weight, targets, batch["alignment"], batch["labels"], vocab_map, chunk_size=13, **kw
    )
    grads = torch.autograd.grad(out.loss, [hidden, weight])
    for name in ("loss", "kd", "ce", "num_tokens"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert grads[1][len(student) :].eq(0).all()  # the padded rows are no token
