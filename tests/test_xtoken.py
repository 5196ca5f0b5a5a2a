"""Cross-tokenizer alignment and vocabulary map (distill/xtoken.py) on the tiny pair: the student's
Llama-style tokenizer (bos, `13` one token, `<|user|>` markup) and teacher_xtok's Qwen-style one (no
bos, digits one by one, ChatML). Each alignment below is written by hand from the two tokenisations,
which the tests spell out first: position i predicts token i + 1, and a student position is aligned
with the teacher position that predicts from the same byte of the visible text."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from distill import data, xtoken
from distill.errors import UserError
from distill.xtoken import NO_TOKEN, Piece

ROOT = Path(__file__).resolve().parent.parent / "tiny_models"


@pytest.fixture(scope="module")
def student():
    return AutoTokenizer.from_pretrained(ROOT / "student")


@pytest.fixture(scope="module")
def teacher():
    return AutoTokenizer.from_pretrained(ROOT / "teacher_xtok")


def encode_both(student, teacher, row):
    s, t = xtoken.encode(student, row, "student"), xtoken.encode(teacher, row, "teacher")
    return s, t, student.convert_ids_to_tokens(s.ids), teacher.convert_ids_to_tokens(t.ids), xtoken.align(s, t)


# --- alignment of known strings --------------------------------------------------------------------


def test_multi_digit_numerals_align_only_where_both_sides_have_a_boundary(student, teacher):
    _, _, s_tok, t_tok, alignment = encode_both(student, teacher, {"text": "Add 13 and 45."})
    assert s_tok == ["<s>", "A", "d", "d", "Ġ13", "Ġand", "Ġ45", ".", "</s>"]
    assert t_tok == ["A", "d", "d", "Ġ", "1", "3", "Ġand", "Ġ", "4", "5", ".", "<|endoftext|>"]
    # <s>: predicts the text's first byte, which no teacher position does (it has no bos) -> -1.
    # "d" predicts " 13" from byte 3 <-> the teacher's "d" (2) predicts " " from byte 3.
    # " 13" predicts from byte 6 <-> "3" (5); " 45" from byte 13 <-> "5" (9). The teacher's "Ġ", "1",
    # "4" positions predict from inside a student token: no student position shares them.
    # "." predicts the end of the text (</s>) <-> "." (10) predicts <|endoftext|>. </s>: last, -1.
    assert alignment == [-1, 0, 1, 2, 5, 6, 9, 10, -1]


def test_bos_on_one_side_only_shifts_nothing_and_collapses_nothing(student, teacher):
    """The student has a bos, the teacher none; and the other way round. Only the bos position (no
    teacher position predicts a text's first token without one) and the last are unaligned."""
    text = "The capital of Zorvia is Malbek. Queen Mirel rules Zorvia."
    s, t, _, _, alignment = encode_both(student, teacher, {"text": text})
    assert s.ids[0] == student.bos_token_id and teacher.bos_token_id is None
    assert alignment[0] == -1 and alignment[-1] == -1
    aligned = [(i, j) for i, j in enumerate(alignment) if j >= 0]
    assert len(aligned) == len(s.ids) - 2  # every other student position has its teacher position
    assert all(j2 > j1 for (_, j1), (_, j2) in zip(aligned, aligned[1:]))  # in order, one to one
    back = xtoken.align(t, s)  # teacher_xtok as the student: its first position is the student's second
    assert back[0] == 1 and sum(j >= 0 for j in back) == len(aligned)


def test_whitespace_runs_and_newlines_align(student, teacher):
    _, _, s_tok, t_tok, alignment = encode_both(student, teacher, {"text": "a  b\n\nc"})
    assert s_tok == ["<s>", "a", "Ġ", "Ġb", "Ċ", "Ċ", "c", "</s>"]
    assert t_tok == ["a", "Ġ", "Ġb", "Ċ", "Ċ", "c", "<|endoftext|>"]
    assert alignment == [-1, 0, 1, 2, 3, 4, 5, -1]


def test_emoji_split_into_byte_tokens_aligns_around_the_character_not_inside_it(student, teacher):
    """Byte-level BPE splits 😀 into four byte tokens, all with the character's offsets: positions
    between them predict from inside a character, which no text boundary is."""
    s, _, s_tok, t_tok, alignment = encode_both(student, teacher, {"text": "Hi 😀 there"})
    assert s_tok == ["<s>", "H", "i", "Ġ", "ð", "Ł", "ĺ", "Ģ", "Ġthe", "re", "</s>"]
    assert t_tok == ["H", "i", "Ġ", "ð", "Ł", "ĺ", "Ģ", "Ġthe", "re", "<|endoftext|>"]
    # "Ġ" predicts the emoji from byte 3 (3 <-> 2); "Ģ", its last byte, predicts " there" from byte 7.
    assert alignment == [-1, 0, 1, 2, -1, -1, -1, 6, 7, 8, -1]
    keys = xtoken.prediction_keys(s.pieces, s.ends)
    assert keys[3] == 1 + 3 and keys[7] == 1 + 7  # content coordinates: 1 + the byte offset


def test_prompt_completion_aligns_the_completion_and_counts_no_unaligned_target(student, teacher):
    row = {"prompt": "Q: 7 plus 5?\nA:", "completion": " 12."}
    s, _, s_tok, t_tok, alignment = encode_both(student, teacher, row)
    assert s_tok == ["<s>", "Q", ":", "Ġ7", "Ġplus", "Ġ5", "?", "Ċ", "A", ":", "Ġ12", ".", "</s>"]
    assert t_tok[10:] == [":", "Ġ", "1", "2", ".", "<|endoftext|>"]
    # ":" predicts the completion from byte 15 <-> the teacher's ":" (10); " 12" predicts "." <-> "2"
    # (13); "." predicts the end <-> "." (14).
    assert alignment[9:] == [10, 13, 14, -1]
    labels = [i if target else -100 for i, target in zip(s.ids, s.target)]
    assert xtoken.unaligned_targets(alignment, labels) == 0


def test_chat_each_side_its_own_template_aligned_on_the_assistant_content(student, teacher):
    """The student renders <s><|user|>\\nHi</s>\\n<|assistant|>\\n...</s>\\n, the teacher ChatML. The
    assistant's content aligns, its first token from the last template token before it and the end
    of turn (</s> vs <|im_end|>) from its last token; the user's turn and the markup do not."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The capital is Malbek."}]
    s, _, s_tok, t_tok, alignment = encode_both(student, teacher, {"messages": messages})
    assert s_tok[7:] == ["<|assistant|>", "Ċ", "The", "Ġcapital", "Ġis", "ĠMalbek", ".", "</s>", "Ċ"]
    assert t_tok[15:] == ["t", "Ċ", "The", "Ġcapital", "Ġis", "ĠM", "al", "b", "e", "k", ".", "<|im_end|>", "Ċ"]
    assert alignment[:8] == [-1] * 8
    assert alignment[8:] == [16, 17, 18, 19, 24, 25, -1, -1]
    labels = [i if target else -100 for i, target in zip(s.ids, s.target)]
    # Targets: the content, </s> and the "\n" after it (as the same-tokenizer path marks them); the
    # "\n" is predicted from after </s>, markup with no teacher counterpart: one unaligned target.
    assert xtoken.unaligned_targets(alignment, labels) == 1


def test_identical_tokenizers_align_every_position_with_itself(student):
    """Markup included (the "\\n" after </s> is a target with no content boundary before it), so that
    one tokenizer on both sides is the same-tokenizer path exactly."""
    for row in (
        {"text": "Add 13 and 45. Hi 😀"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello 7."}]},
    ):
        s = xtoken.encode(student, row)
        assert xtoken.align(s, s) == list(range(len(s.ids) - 1)) + [-1]


def test_trimmed_offsets_give_the_same_keys_as_untrimmed_ones():
    """Some byte-level tokenizers trim a token's leading space from its offsets: "a", " b" is (0, 1),
    (2, 3) instead of (0, 1), (1, 3). The space still belongs to " b"."""
    text = "a b"
    untrimmed, ends = xtoken.pieces_of([(0, 1), (1, 3)], text, [(0, 3)])
    trimmed, _ = xtoken.pieces_of([(0, 1), (2, 3)], text, [(0, 3)])
    assert trimmed == untrimmed == [Piece(1, 2), Piece(2, 4)]
    assert xtoken.prediction_keys(trimmed + [Piece(4, 4)], ends) == [2, 4, -1]


def test_span_end_and_next_span_start_are_different_keys():
    """Two spans "ab" and "cd" with template text between: the end of the first (3) and the start of
    the second (4) are told apart, and the template token predicts nothing."""
    text = "ab|cd"
    pieces, ends = xtoken.pieces_of([(0, 2), (2, 3), (3, 5)], text, [(0, 2), (3, 5)])
    assert pieces == [Piece(1, 3), Piece(3, 3), Piece(4, 6)] and ends == {3, 6}
    assert xtoken.prediction_keys(pieces, ends) == [3, 4, -1]


# --- what is refused ---------------------------------------------------------------------------------


def test_a_tokenizer_without_offsets_is_a_user_error(student):
    slow = types.SimpleNamespace(is_fast=False)
    with pytest.raises(UserError, match="teacher tokenizer .* not a fast tokenizer"):
        xtoken.encode(slow, {"text": "x"}, "teacher")


def test_chat_with_a_teacher_without_template_is_a_user_error(student, teacher):
    bare = AutoTokenizer.from_pretrained(ROOT / "teacher_xtok")
    bare.chat_template = None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(UserError, match="teacher tokenizer has no chat template"):
        data.tokenize_pair({"messages": messages}, student, bare, 64)


def test_a_template_that_rewrites_the_content_is_a_user_error(student):
    upper = AutoTokenizer.from_pretrained(ROOT / "teacher_xtok")
    upper.chat_template = upper.chat_template.replace("message['content']", "message['content'] | upper")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(UserError, match="teacher's chat template changes an assistant message's content"):
        data.tokenize_pair({"messages": messages}, student, upper, 64)


# --- the data path ---------------------------------------------------------------------------------


def read_jsonl(name):
    return [json.loads(line) for line in (ROOT / "data" / name).read_text().splitlines()]


def test_tokenize_pair_keeps_the_students_ids_and_labels_of_the_same_tokenizer_path(student, teacher):
    rows = read_jsonl("domain_train.jsonl")[:5] + read_jsonl("chat_train.jsonl")[:5]
    for row in rows:
        pair = data.tokenize_pair(row, student, teacher, 512)
        same = (data._messages if "messages" in row else data._prompt_completion)(row, student, 512)
        assert pair["input_ids"] == same["input_ids"] and pair["labels"] == same["labels"]
        assert len(pair["alignment"]) == len(pair["input_ids"])
        assert all(-1 <= j < len(pair["teacher_input_ids"]) for j in pair["alignment"])
        # Each aligned teacher position's next token starts the same text as the student's next token.
        for i, j in enumerate(pair["alignment"]):
            if j >= 0 and pair["labels"][i + 1] != -100:
                s_next = student.decode(pair["input_ids"][i + 1 :], skip_special_tokens=True)
                t_next = teacher.decode(pair["teacher_input_ids"][j + 1 :], skip_special_tokens=True)
                assert s_next.startswith(t_next[:1]) or t_next.startswith(s_next[:1])


def test_tokenize_pair_truncates_both_sides_and_unaligns_cut_teacher_positions(student, teacher):
    row = {"prompt": "Q: 7 plus 5?\nA:", "completion": " 12."}
    full = data.tokenize_pair(row, student, teacher, 512)
    cut = data.tokenize_pair(row, student, teacher, 11, teacher_max_length=12)
    assert cut["input_ids"] == full["input_ids"][:11] and len(cut["teacher_input_ids"]) == 12
    assert cut["alignment"] == [j if j < 12 else -1 for j in full["alignment"][:11]]
    assert cut["alignment"][10] == -1 and full["alignment"][10] == 13


def test_unaligned_targets_counts_target_positions_without_a_teacher_position():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 3, 4, -100, -100]])
    alignment = torch.tensor([[-1, 0, -1, 2, -1], [-1, 2, 3, -1, -1]])
    # Targets are positions 1, 2, 3 (row 0) and 0, 1 (row 1); unaligned: (0, 2), (1, 0).
    assert xtoken.unaligned_targets(alignment, labels) == 2


# --- the vocabulary map ----------------------------------------------------------------------------


def test_identical_tokenizers_give_the_identity_map(student):
    vmap = xtoken.build_vocab_map(student, student)
    assert vmap.ids[:, 0].tolist() == list(range(len(student))) and vmap.exact.all()
    assert vmap.weights.sum(-1).eq(1).all()


def test_exact_matches_are_pinned_and_others_go_to_the_first_teacher_token(student, teacher):
    vmap = xtoken.build_vocab_map(student, teacher)
    assert vmap.ids.shape == (len(student), 4) and vmap.teacher_vocab_size == len(teacher)
    assert vmap.weights[:, 0].eq(1).all() and vmap.weights[:, 1:].eq(0).all()

    def row(token):
        s = student.convert_tokens_to_ids(token)
        return teacher.convert_ids_to_tokens([t for t in vmap.ids[s].tolist() if t >= 0]), bool(vmap.exact[s])

    assert row("Ġthe") == (["Ġthe"], True)
    assert row("ð") == (["ð"], True)  # a piece of a UTF-8 character, the same byte on both sides
    assert row("Ġ13") == (["Ġ", "1", "3"], False)  # mass on "Ġ": the teacher's next token at that boundary
    assert row("ĠMalbek") == (["ĠM", "al", "b", "e"], False)  # the first k = 4 kept
    assert row("</s>") == (["<|endoftext|>"], True)  # eos -> eos by default
    assert row("<s>") == ([], False) and row("<|user|>") == ([], False)  # unpaired specials: the tail


def test_special_pairs_map_the_end_of_turn_tokens(student, teacher):
    eot_s, eot_t = xtoken.end_of_turn_id(student), xtoken.end_of_turn_id(teacher)
    assert student.convert_ids_to_tokens(eot_s) == "</s>" and teacher.convert_ids_to_tokens(eot_t) == "<|im_end|>"
    vmap = xtoken.build_vocab_map(student, teacher, special_pairs={eot_s: eot_t})
    assert vmap.ids[eot_s, 0] == eot_t and vmap.exact[eot_s]
    assert vmap.exact_student_of()[eot_t] == eot_s and vmap.reachable()[eot_t]


def test_map_saves_loads_and_refuses_another_pair(student, teacher, tmp_path):
    vmap = xtoken.build_vocab_map(student, teacher)
    path = tmp_path / "vocab_map.safetensors"
    vmap.save(path)
    vmap.save(path)  # the same map again: nothing to do
    back = xtoken.VocabMap.load(path, student, teacher)
    assert back.ids.equal(vmap.ids) and back.weights.equal(vmap.weights) and back.exact.equal(vmap.exact)
    assert back.teacher_vocab_size == vmap.teacher_vocab_size
    with pytest.raises(UserError, match="another teacher tokenizer"):
        xtoken.VocabMap.load(path, student, student)
    with pytest.raises(UserError, match="already holds another vocabulary map"):
        xtoken.build_vocab_map(student, student).save(path)
    chat = {xtoken.end_of_turn_id(student): xtoken.end_of_turn_id(teacher)}  # </s> -> <|im_end|>
    with pytest.raises(UserError, match="maps special tokens"):
        xtoken.VocabMap.load(path, student, teacher, special_pairs=chat)


def test_no_token_entries_put_their_mass_nowhere_in_the_teacher_vocabulary(student, teacher):
    vmap = xtoken.build_vocab_map(student, teacher)
    bos = student.bos_token_id
    assert vmap.ids[bos, 0] == NO_TOKEN
    assert not vmap.reachable()[teacher.convert_tokens_to_ids("<|im_start|>")]


# --- the whole path on the tiny models ----------------------------------------------------------------


def collate_pairs(pairs: list[dict], pad_id: int, teacher_pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad each field: ids with the pad id, labels with -100, alignment with -1."""

    def pad(key, value):
        width = max(len(p[key]) for p in pairs)
        return torch.tensor([p[key] + [value] * (width - len(p[key])) for p in pairs])

    return {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", -100),
        "teacher_input_ids": pad("teacher_input_ids", teacher_pad_id),
        "alignment": pad("alignment", -1),
    }


@torch.no_grad()
def test_one_tokenizer_through_the_pair_path_is_the_same_tokenizer_loss(student):
    """Tiny teacher -> tiny student (one tokenizer) on chat and prompt/completion rows: tokenize_pair,
    the identity map and xtoken_distillation_loss give topk_distillation_loss to 1e-6."""
    from transformers import AutoModelForCausalLM

    from distill.losses import teacher_topk, topk_distillation_loss, xtoken_distillation_loss

    rows = read_jsonl("chat_train.jsonl")[:4] + read_jsonl("domain_train.jsonl")[:4]
    b = collate_pairs([data.tokenize_pair(r, student, student, 512) for r in rows], 0, 0)
    assert b["teacher_input_ids"].equal(b["input_ids"])
    teacher_model = AutoModelForCausalLM.from_pretrained(ROOT / "teacher").eval()
    student_model = AutoModelForCausalLM.from_pretrained(ROOT / "student").eval()
    mask = b["input_ids"].ne(0).long()
    s_logits = student_model(input_ids=b["input_ids"], attention_mask=mask).logits
    t_logits = teacher_model(input_ids=b["teacher_input_ids"], attention_mask=mask).logits[..., : len(student)]
    targets = teacher_topk(t_logits, 8)
    same = topk_distillation_loss(s_logits, targets, b["labels"], loss_type="jsd", beta=0.2)
    vmap = xtoken.build_vocab_map(student, student)
    cross = xtoken_distillation_loss(s_logits, targets, b["alignment"], b["labels"], vmap, loss_type="jsd", beta=0.2)
    for x, y in zip(cross, same):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_the_cross_tokenizer_pair_trains_on_aligned_rows_with_finite_losses(student, teacher):
    """teacher_xtok -> student on held-out text: every method gives a finite, positive kd, and at
    aligned positions the trained teacher's top-1 is the data's next text more often than not."""
    from transformers import AutoModelForCausalLM

    from distill.losses import teacher_topk, xtoken_distillation_loss

    rows = read_jsonl("corpus_eval.jsonl")[:4]
    b = collate_pairs([data.tokenize_pair(r, student, teacher, 96) for r in rows], 0, teacher.pad_token_id)
    # Unaligned targets: the bos position's (no teacher position predicts a text's first token).
    assert xtoken.unaligned_targets(b["alignment"], b["labels"]) == len(rows)
    teacher_model = AutoModelForCausalLM.from_pretrained(ROOT / "teacher_xtok").eval()
    student_model = AutoModelForCausalLM.from_pretrained(ROOT / "student").eval()
    s_logits = student_model(input_ids=b["input_ids"], attention_mask=b["input_ids"].ne(0).long()).logits
    # Right padding after each row's tokens: causal attention never reads it from a real position.
    t_logits = teacher_model(input_ids=b["teacher_input_ids"]).logits[..., : len(teacher)]
    targets = teacher_topk(t_logits, 16)
    vmap = xtoken.build_vocab_map(student, teacher)
    for method in ("projected", "uld", "hybrid"):
        out = xtoken_distillation_loss(s_logits, targets, b["alignment"], b["labels"], vmap, method=method)
        assert out.kd.isfinite() and out.kd > 0 and out.ce.isfinite()
    # The teacher's top-1 at aligned target positions starts the student's label text, mostly.
    hits = total = 0
    for r in range(len(rows)):
        for i, j in enumerate(b["alignment"][r].tolist()[:-1]):
            if j < 0 or b["labels"][r, i + 1] < 0:
                continue
            label = student.decode([int(b["labels"][r, i + 1])])
            guess = teacher.decode([int(targets.ids[r, j, 0])])
            hits += bool(guess) and (label.startswith(guess) or guess.startswith(label))
            total += 1
    print(f"teacher top-1 starts the label at {hits}/{total} aligned target positions")
    assert total > 40 and hits / total > 0.5
