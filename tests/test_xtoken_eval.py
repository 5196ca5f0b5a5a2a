"""Specifications of `distill eval` with a teacher of another tokenizer: agreement at byte-aligned
positions (training's eval_agreement), bits per byte for both models, and a report that says the
tokenizers differ."""

import copy
import json
import math

import pytest
import torch

from distill import evaluate, xtoken
from distill.cli import main
from distill.data import Collator, load_rows, tokenize
from distill.losses import IGNORE_INDEX
from distill.models import load_model, load_tokenizer
from distill.teacher import CrossTopK

from conftest import DATA, STUDENT, TEACHER, TINY, SlowTokenizer

TEACHER_XTOK = str(TINY / "teacher_xtok")
HELD_OUT = str(DATA / "domain_eval.jsonl")


def batches_of(data, collate, size=4):
    return [collate([data[j] for j in range(i, min(i + size, len(data)))]) for i in range(0, len(data), size)]


@pytest.fixture(scope="module")
def models():
    return {p: load_model(p).eval() for p in (STUDENT, TEACHER, TEACHER_XTOK)}


def head_cut(model, rows):
    out = copy.deepcopy(model)
    out.lm_head = torch.nn.Linear(out.lm_head.in_features, rows, bias=False)
    out.lm_head.weight.data = model.lm_head.weight.data[:rows].clone()
    return out


def noisy_copy(model, scale=0.5):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return out


def test_identical_tokenizers_through_the_cross_path_give_the_same_tokenizer_numbers(models):
    """The same-path property: one tokenizer on both sides, forced through the cross path (identity
    map, position-by-position alignment), gives exactly the same-tokenizer agreement, every target
    aligned, and the same NLL and KL."""
    tok = load_tokenizer(STUDENT)
    rows = load_rows(HELD_OUT).select(range(12))
    same = tokenize(rows, tok, 64)
    pair = evaluate.pair_data(rows, tok, tok, 64, 128, "held out")
    assert pair["input_ids"] == same["input_ids"] and pair["labels"] == same["labels"]  # the same rows
    # Heads cut to the tokenizer, so that both paths softmax over the same ids (the cross path takes the
    # tokenizer's ids only, the same-tokenizer one every id the two heads share); a noisy copy of the
    # teacher agrees with it at times.
    teacher = head_cut(models[TEACHER], len(tok))
    student = noisy_copy(teacher)
    a = evaluate.score(teacher, student, batches_of(same, Collator(tok.pad_token_id)))
    vocab_map = xtoken.build_vocab_map(tok, tok)
    b = evaluate.score_across(
        teacher, student, batches_of(pair, evaluate.PairCollator(tok.pad_token_id, tok.pad_token_id)), vocab_map
    )
    assert b["aligned"] == b["targets"] == b["targets_teacher"] == a["targets"]
    assert b["matches"] == a["matches"] and 0 < a["matches"] < a["targets"]
    for key in ("nll_teacher", "nll_student", "kl"):
        assert b[key] == pytest.approx(a[key], rel=1e-5)


def test_agreement_across_tokenizers_counts_aligned_targets_whose_mapped_top1_is_the_teachers():
    """`xtoken.mapped_agreement` (training's held-out agreement, `CrossTopK.agreement`, and `distill
    eval`'s) against a loop written from its definition, on a map with ties, unaligned positions and
    non-targets: position p counts when label p + 1 is a target and p has a teacher position a, and
    then matches when the student's top-1 at p, sent through the map, is the teacher's top-1 at a."""
    g = torch.Generator().manual_seed(0)
    s_tok, t_tok = load_tokenizer(STUDENT), load_tokenizer(TEACHER_XTOK)
    vocab_map = xtoken.build_vocab_map(s_tok, t_tok)
    student_top1 = torch.randint(0, len(s_tok), (3, 20), generator=g)
    teacher_top1 = vocab_map.ids[student_top1[:, :15], 0].clamp(min=0)  # many matches, some not
    teacher_top1[:, ::3] = torch.randint(0, len(t_tok), (3, 5), generator=g)
    alignment = torch.randint(-1, 15, (3, 20), generator=g)
    labels = torch.randint(0, len(s_tok), (3, 20), generator=g)
    labels[:, ::4] = IGNORE_INDEX
    matches = counted = 0
    for b in range(3):
        for p in range(19):
            a = int(alignment[b, p])
            if labels[b, p + 1] != IGNORE_INDEX and a >= 0:
                counted += 1
                matches += int(vocab_map.ids[student_top1[b, p], 0]) == int(teacher_top1[b, a])
    ours = xtoken.mapped_agreement(student_top1, teacher_top1, labels, alignment, vocab_map)
    assert [int(x) for x in ours] == [matches, counted] and 0 < matches < counted
    training = CrossTopK(None, alignment, vocab_map, "projected").agreement(student_top1, teacher_top1, labels)
    assert [int(x) for x in training] == [matches, counted]


def test_bits_per_byte_is_the_nll_of_the_tokens_over_the_bytes_of_their_text(models):
    """Bits per byte = sum of the per-token NLL / ln 2 / the UTF-8 bytes of the text those tokens
    spell, computed by hand in float64 on one text with multi-byte characters: the student (with a
    bos) scores every byte of it, the teacher (no bos) all but its first token's."""
    text = "Anouk lived in Oskin, caf\u00e9 na\u00efve \u2615. She counted 13 swans."
    row = {"text": text}
    s_tok, t_tok = load_tokenizer(STUDENT), load_tokenizer(TEACHER_XTOK)
    data = evaluate.pair_data(load_rows_of([row]), s_tok, t_tok, 128, 256, "one text")
    sums = evaluate.score_across(
        models[TEACHER_XTOK], models[STUDENT],
        batches_of(data, evaluate.PairCollator(s_tok.pad_token_id, t_tok.pad_token_id)),
        xtoken.build_vocab_map(s_tok, t_tok),
    )  # fmt: skip
    for tok, model, role in ((s_tok, models[STUDENT], "student"), (t_tok, models[TEACHER_XTOK], "teacher")):
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
        nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        first = b"" if tok.bos_token_id == ids[0] else tok.decode(ids[:1]).encode()
        nbytes = len(text.encode()) - len(first)
        assert sums[f"bytes_{role}"] == nbytes
        assert sums["targets" if role == "student" else "targets_teacher"] == len(ids) - 1
        got = evaluate.per_byte(sums[f"nll_{role}"], len(ids) - 1, sums[f"bytes_{role}"], 1.0)
        mean_ce = nll / (len(ids) - 1)
        assert got["bits_per_byte"] == pytest.approx(mean_ce * (len(ids) - 1) / nbytes / math.log(2), rel=1e-5)
        assert got["flops_per_byte"] == pytest.approx((len(ids) - 1) / nbytes)
    assert sums["bytes_teacher"] < sums["bytes_student"]  # no bos: the teacher never predicts its first token


def load_rows_of(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_new_bytes_count_each_byte_of_the_text_once():
    """Summed over a side's tokens, `new_bytes` is the text's UTF-8 length, for either tokenizer, even
    where a byte-level tokenizer splits one character over several tokens."""
    text = "na\u00efve \u2615\U0001f600 caf\u00e9, 13 swans"
    for path in (STUDENT, TEACHER_XTOK):
        enc = xtoken.encode(load_tokenizer(path), {"text": text})
        widths = xtoken.new_bytes(enc.pieces)
        assert sum(widths) == len(text.encode()) and min(widths) >= 0


@pytest.fixture(scope="module")
def cross_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("xtok") / "report"
    args = ["eval", "--teacher", TEACHER_XTOK, "--student", STUDENT, "--data", str(DATA / "corpus_eval.jsonl"),
            "--max_samples", "8", "--max_length", "64", "--batch_size", "4", "--num_prompts", "1",
            "--max_new_tokens", "4", "--output_dir", str(out)]  # fmt: skip
    assert main(args) == 0
    return json.loads((out / "eval_report.json").read_text()), out


def test_a_cross_tokenizer_eval_reports_per_byte_and_aligned_numbers(cross_report):
    r, out = cross_report
    tk = r["tokenizers"]
    assert tk["differ"] and tk["student"]["tokens"] == 902 and tk["teacher"]["tokens"] == 600
    assert tk["aligned_targets"] + tk["unaligned_targets"] == tk["student_targets"] == r["data"]["target_tokens"]
    assert 0 < tk["unaligned_targets"] < tk["student_targets"]  # the student's bos position: counted, not hidden
    assert tk["teacher_tokens_per_student_token"] > 1  # digits one by one, a smaller vocabulary
    s, t = r["student"], r["teacher"]
    assert s["aligned_share"] == tk["aligned_targets"] / tk["student_targets"]
    assert 0 <= s["top1_agreement"] < 0.1 and s["kl_teacher_student"] > 1  # an untrained student
    for m in (s, t):
        assert m["bits_per_byte"] == pytest.approx(
            m["mean_cross_entropy"] * m["target_tokens"] / m["target_bytes"] / math.log(2)
        )
    assert t["bits_per_byte"] < s["bits_per_byte"]
    # Per-token ratios would compare different tokens: only per-byte ones are given.
    assert set(r["student_over_teacher"]) == {"parameters", "flops_per_byte", "bits_per_byte"}
    md = (out / "eval_report.md").read_text()
    assert "**The tokenizers differ**" in md and f"{s['bits_per_byte']:.4g}" in md
    assert "perplexity per own token (not comparable)" in md and "| perplexity |" not in md
    assert r["generations"] and (out / "quality_vs_cost.png").is_file()


def test_a_cross_report_is_not_compared_with_a_same_tokenizer_one(cross_report, tmp_path, capsys):
    _, out = cross_report
    code = main(["eval", "--teacher", TEACHER, "--student", STUDENT, "--data", str(DATA / "corpus_eval.jsonl"),
                 "--max_samples", "8", "--max_length", "64", "--compare", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "across tokenizers" in err and "Traceback" not in err


def test_a_tokenizer_without_offsets_is_refused_before_any_model_loads(monkeypatch, capsys):
    real = evaluate.load_tokenizer
    monkeypatch.setattr(evaluate, "load_tokenizer", lambda p: SlowTokenizer(real(p)) if p == TEACHER_XTOK else real(p))
    monkeypatch.setattr(evaluate, "load_eval_model", lambda *a: pytest.fail("a model was loaded"))
    code = main(["eval", "--teacher", TEACHER_XTOK, "--student", STUDENT, "--data", HELD_OUT])
    err = capsys.readouterr().err
    assert code == 2 and "teacher tokenizer" in err and "not a fast tokenizer" in err and "Traceback" not in err


def test_across_tokenizers_training_pays_for_itself_in_bytes_of_text(tmp_path):
    """The break-even compares costs per byte (the unit both tokenizers share), not per token."""
    spent = {"flops": {"total": 1e12}, "pflops_days": {"total": 1e-8}, "wall_seconds": 3.0}
    (tmp_path / "cost_report.json").write_text(json.dumps(spent))
    teacher, student = {"flops_per_token": 9e5, "flops_per_byte": 4e5}, {"flops_per_token": 1e6, "flops_per_byte": 1e5}
    section = evaluate.training_section(str(tmp_path), [{"step": 1, "loss": 2.0}], teacher, student, cross=True)
    assert section["cost"]["breakeven_bytes"] == pytest.approx(1e12 / 3e5)
    assert "breakeven_tokens" not in section["cost"]  # per token the student even looks dearer here


def test_the_agreement_is_the_runs_eval_agreement_on_the_runs_held_out_rows(tmp_path):
    """A short `distill train` across tokenizers, then `distill eval` of its student on the same
    held-out rows at the same max_length: the two agreements are one number, to the last digit, and
    the two unaligned counts too."""
    from distill import train

    held_out, rows, length = str(DATA / "corpus_eval.jsonl"), 24, 64
    values = {
        "model_name_or_path": STUDENT, "teacher_model_name_or_path": TEACHER_XTOK,
        "dataset": str(DATA / "corpus_train.jsonl"), "eval_dataset": held_out, "max_train_samples": 64,
        "max_eval_samples": rows, "max_length": length, "per_device_train_batch_size": 8, "max_steps": 6,
        "learning_rate": 3e-3, "alpha": 0.5, "use_cpu": True, "output_dir": str(tmp_path / "run"),
        "report_to": "none", "disable_tqdm": True, "save_strategy": "no",
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    metrics = train.run(str(path))
    out = tmp_path / "eval"
    args = ["eval", "--teacher", TEACHER_XTOK, "--student", str(tmp_path / "run"), "--data", held_out,
            "--max_samples", str(rows), "--max_length", str(length), "--num_prompts", "0", "--output_dir", str(out)]  # fmt: skip
    assert main(args) == 0
    r = json.loads((out / "eval_report.json").read_text())
    assert r["student"]["top1_agreement"] == metrics["eval"]["eval_agreement"] > 0.05
    assert r["tokenizers"]["unaligned_targets"] == metrics["cross_tokenizer"]["eval"]["unaligned_targets"]
