"""Specifications of the data pipeline: which tokens are targets, how rows become batches."""

import json
import re

import datasets
import pytest

from distill.config import DataArguments
from distill.data import Collator, build_datasets, detect_format, load_rows, tokenize
from distill.errors import UserError
from distill.losses import IGNORE_INDEX


def test_text_is_packed_into_full_blocks_with_eos_at_the_seams(tokenizer):
    rows = datasets.Dataset.from_dict({"text": ["the first row", "a second, longer row of text", "third"]})
    out = tokenize(rows, tokenizer, max_length=8)
    stream = sum(out["input_ids"], [])
    assert all(len(ids) == 8 for ids in out["input_ids"][:-1])
    assert stream.count(tokenizer.eos_token_id) == 3
    assert out["labels"] == out["input_ids"]  # every packed token is a target


def test_prompt_completion_trains_on_the_completion_and_its_eos_only(tokenizer):
    rows = datasets.Dataset.from_dict({"prompt": ["Q: capital?\nA:"], "completion": [" Malbek."]})
    row = tokenize(rows, tokenizer, max_length=64)[0]
    prompt_len = len(tokenizer("Q: capital?\nA:")["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    targets = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(targets[:-1]) == " Malbek." and targets[-1] == tokenizer.eos_token_id


def test_chat_trains_on_assistant_tokens_only(tokenizer):
    messages = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "general kenobi"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "yes"},
    ]
    row = tokenize(datasets.Dataset.from_dict({"messages": [messages]}), tokenizer, max_length=256)[0]
    target_text = tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert "general kenobi" in target_text and "yes" in target_text
    assert "hello" not in target_text and "again" not in target_text


def test_format_is_read_off_the_columns():
    assert detect_format(datasets.Dataset.from_dict({"messages": [[]], "text": ["x"]})) == "messages"
    assert detect_format(datasets.Dataset.from_dict({"prompt": ["a"], "completion": ["b"]})) == "prompt_completion"
    assert detect_format(datasets.Dataset.from_dict({"text": ["x"]})) == "text"
    assert detect_format(datasets.Dataset.from_dict({"body": ["x"], "prompt": ["only a prompt"]})) == "prompt"
    with pytest.raises(ValueError, match="`messages`.*`prompt` and `completion`.*`text`.*a `prompt` column"):
        detect_format(datasets.Dataset.from_dict({"body": ["x"], "question": ["?"]}))


def test_an_empty_dataset_is_refused(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        tokenize(datasets.Dataset.from_dict({"text": []}), tokenizer, max_length=8)
    with pytest.raises(ValueError):
        build_datasets(DataArguments(dataset=str(empty)), tokenizer)


def test_missing_and_unknown_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(ValueError, match="unknown type"):
        load_rows(str(tmp_path / "data.xml"))


def test_held_out_rows_are_cut_before_packing(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"item {i} ends"}) for i in range(40)))
    train, held_out = build_datasets(DataArguments(dataset=str(path), eval_fraction=0.25, max_length=16), tokenizer)

    def items(split):
        text = tokenizer.decode(sum(split["input_ids"], []), skip_special_tokens=True)
        return {int(i) for i in re.findall(r"item (\d+) ends", text)}

    assert len(items(held_out)) == 10 and len(items(train)) == 30
    assert not items(train) & items(held_out)


def test_collator_right_pads_with_minus_100_labels_and_a_zero_mask():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [IGNORE_INDEX]}]
    batch = Collator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, -100], [-100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize(
    "rows,why",
    [
        ({"prompt": ["Q: a?\nA:", "Q: b?\nA:"], "completion": ["", " "]}, "the completion is empty"),
        (
            {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]] * 2},
            "no assistant turn has content",
        ),
        ({"text": ["", ""]}, "the text is empty"),
    ],
    ids=["prompt-completion", "messages", "text"],
)
def test_data_without_any_target_text_is_refused(tokenizer, rows, why):
    """Every row would keep only an end-of-sequence token as its target: nothing to learn."""
    with pytest.raises(UserError, match=f"has nothing to train on: in all 2 rows {why}"):
        tokenize(datasets.Dataset.from_dict(rows), tokenizer, max_length=64)


def test_rows_with_an_empty_completion_among_good_ones_are_kept_and_counted_aloud(tokenizer, capsys):
    """An empty answer still teaches to stop (as a teacher that stopped at once did), so the row stays;
    but such rows usually mean a generation or conversion went wrong, so their number is printed."""
    rows = datasets.Dataset.from_dict(
        {"prompt": ["Q: a?\nA:", "Q: b?\nA:", "Q: c?\nA:"], "completion": [" x", "", " z"]}
    )
    out = tokenize(rows, tokenizer, max_length=64, name="dataset d.jsonl")
    assert len(out) == 3
    assert [t for t in out[1]["labels"] if t != IGNORE_INDEX] == [tokenizer.eos_token_id]
    assert "dataset d.jsonl: in 1 of 3 rows the completion is empty" in capsys.readouterr().out
