"""tiny_models/ is the contract the tests and the default recipe build on: a trained teacher and an untrained,
narrower student that load from a local path, share one tokenizer, and come with held-out data.
Rebuild with `python scripts/build_tiny_models.py`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent / "tiny_models"


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data" / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ROOT / "teacher")


@pytest.fixture(scope="module")
def teacher():
    return AutoModelForCausalLM.from_pretrained(ROOT / "teacher").eval()


@pytest.fixture(scope="module")
def student():
    return AutoModelForCausalLM.from_pretrained(ROOT / "student").eval()


@torch.no_grad()
def eval_loss(model, tok, texts: list[str], batch: int = 32) -> float:
    """Mean next-token cross-entropy per real token, rows right-padded and padding masked out."""
    total, count = 0.0, 0
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        logits = model(**enc).logits[:, :-1].float()
        targets = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").item()
        count += (targets != -100).sum().item()
    return total / count


def test_teacher_and_student_load_as_float32_llamas_with_long_enough_context(teacher, student):
    for model in (teacher, student):
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.dtype == torch.float32
        assert model.config.max_position_embeddings >= 512
    assert teacher.config.num_hidden_layers > student.config.num_hidden_layers
    assert teacher.config.hidden_size > student.config.hidden_size


def test_teacher_is_untied_and_student_ties_its_embeddings(teacher, student):
    assert teacher.lm_head.weight.data_ptr() != teacher.get_input_embeddings().weight.data_ptr()
    assert student.lm_head.weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()


def test_teacher_and_student_ship_the_same_tokenizer(tok):
    other = AutoTokenizer.from_pretrained(ROOT / "student")
    assert other.get_vocab() == tok.get_vocab()
    assert other.all_special_tokens == tok.all_special_tokens
    assert other.chat_template == tok.chat_template
    text = read_jsonl("corpus_eval.jsonl")[0]["text"]
    assert other(text)["input_ids"] == tok(text)["input_ids"]


def test_teacher_vocab_is_padded_to_64_and_student_vocab_is_exact(tok, teacher, student):
    """Teacher logits are wider than the tokenizer (as in real families), the student's are exactly as wide."""
    n = len(tok)
    assert teacher.config.vocab_size == math.ceil(n / 64) * 64 > student.config.vocab_size == n
    assert teacher.get_output_embeddings().weight.shape[0] == teacher.config.vocab_size
    assert student.get_output_embeddings().weight.shape[0] == n
    assert max(tok.get_vocab().values()) == n - 1


def test_tokenizer_prepends_bos_and_never_appends_eos(tok, teacher):
    ids = tok("The capital of Zorvia is Malbek.")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids
    assert tok("The capital", add_special_tokens=False)["input_ids"] == ids[1:3]
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert (teacher.config.bos_token_id, teacher.config.eos_token_id, teacher.config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )


def test_role_markers_are_single_special_tokens(tok):
    for marker in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
        assert marker in tok.all_special_tokens


def test_trained_teacher_predicts_held_out_corpus_far_better_than_untrained_student(tok, teacher, student):
    texts = [row["text"] for row in read_jsonl("corpus_eval.jsonl")]
    teacher_loss, student_loss = eval_loss(teacher, tok, texts), eval_loss(student, tok, texts)
    assert teacher_loss < 0.5 * math.log(len(tok))
    assert teacher_loss < 0.5 * student_loss


def test_held_out_splits_share_no_rows_with_training_splits():
    assert not {r["text"] for r in read_jsonl("corpus_eval.jsonl")} & {
        r["text"] for r in read_jsonl("corpus_train.jsonl")
    }
    assert not {r["prompt"] for r in read_jsonl("domain_eval.jsonl")} & {
        r["prompt"] for r in read_jsonl("domain_train.jsonl")
    }


def test_domain_prompt_completion_boundary_is_a_token_boundary(tok):
    """Tokenizing prompt and completion apart gives the same ids as tokenizing them together."""
    for row in read_jsonl("domain_train.jsonl") + read_jsonl("domain_eval.jsonl"):
        prompt_ids = tok(row["prompt"])["input_ids"]
        completion_ids = tok(row["completion"], add_special_tokens=False)["input_ids"]
        assert tok(row["prompt"] + row["completion"])["input_ids"] == prompt_ids + completion_ids


def test_chat_template_generation_prompt_is_a_prefix_of_the_next_turn(tok):
    """messages[:i] + generation prompt renders to a prefix of messages[:i+1], as text and as token ids,
    so assistant tokens can be located by prefix length."""
    rows = [r["messages"] for r in read_jsonl("chat_train.jsonl")]
    messages = next(m for m in rows if m[0]["role"] == "system" and len(m) >= 5)
    n_checked = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        assert full.startswith(prefix)
        assert full[len(prefix) :] == message["content"] + tok.eos_token + "\n"
        prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        full_ids = tok(full, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prefix_ids)] == prefix_ids
        n_checked += 1
    assert n_checked >= 2


def test_chat_template_writes_one_bos_and_marks_assistant_content_plus_eos(tok):
    messages = next(r["messages"] for r in read_jsonl("chat_train.jsonl") if len(r["messages"]) >= 4)
    enc = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    marked = tok.decode([t for t, m in zip(ids, mask) if m])
    expected = "".join(m["content"] + tok.eos_token for m in messages if m["role"] == "assistant")
    assert marked == expected


def test_tiny_models_folder_is_under_20_mb():
    assert sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file()) < 20e6


# --- teacher_xtok: the same world through another tokenizer ----------------------------------------


@pytest.fixture(scope="module")
def xtok():
    return AutoTokenizer.from_pretrained(ROOT / "teacher_xtok")


@torch.no_grad()
def nats_per_byte(model, tok, texts: list[str]) -> float:
    """Held-out loss per byte of the text each predicted token stands for (special tokens weigh
    nothing): comparable across tokenizers, unlike a loss per token."""
    from distill.xtoken import token_bytes

    size = [len(b or b"") for b in token_bytes(tok)]
    nats, n_bytes = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
        logits = model(input_ids=ids).logits[0, :-1, : len(tok)].float()
        nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n_bytes += sum(size[i] for i in ids[0, 1:].tolist())
    return nats / n_bytes


def test_teacher_xtok_tokenizer_differs_from_the_students_in_bos_digits_and_markup(tok, xtok):
    assert xtok.get_vocab() != tok.get_vocab() and len(xtok) < len(tok)
    assert (
        xtok.bos_token_id is None
        and xtok("Zorvia")["input_ids"] == xtok("Zorvia", add_special_tokens=False)["input_ids"]
    )
    assert xtok.convert_ids_to_tokens(xtok(" 13", add_special_tokens=False)["input_ids"]) == ["Ġ", "1", "3"]
    assert xtok.eos_token == xtok.pad_token == "<|endoftext|>"
    chat = xtok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n"
    assert xtok.is_fast


def test_teacher_xtok_knows_the_world_about_as_well_as_the_teacher(tok, xtok, teacher, student):
    """Per byte of held-out text, within 15% of the teacher and far below the untrained student."""
    texts = [row["text"] for row in read_jsonl("corpus_eval.jsonl")]
    model = AutoModelForCausalLM.from_pretrained(ROOT / "teacher_xtok").eval()
    assert model.config.vocab_size == math.ceil(len(xtok) / 64) * 64 and model.config.bos_token_id is None
    ours, theirs = nats_per_byte(model, xtok, texts), nats_per_byte(teacher, tok, texts)
    assert ours < 1.15 * theirs
    assert ours < 0.2 * nats_per_byte(student, tok, texts)


def test_teacher_xtok_is_under_3_mb():
    assert sum(p.stat().st_size for p in (ROOT / "teacher_xtok").rglob("*") if p.is_file()) < 3e6
