"""Specifications of `distill generate`: the teacher's completions as a dataset, deterministic and
resumable without duplicates."""

import json

import pytest

from distill import generate
from distill.data import load_rows, tokenize
from distill.losses import IGNORE_INDEX
from distill.models import load_model, load_tokenizer

from conftest import DATA, ROOT, STUDENT, TEACHER

BASE = {
    "teacher_model_name_or_path": TEACHER,
    "prompts": str(DATA / "domain_train.jsonl"),
    "max_prompts": 10,
    "chat_template": "false",
    "max_new_tokens": 8,
    "batch_size": 4,
}


def run(tmp_path, name="out.jsonl", **changes):
    values = {**BASE, "output_file": str(tmp_path / name), **changes}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    generate.run(str(recipe))
    return tmp_path / name


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_are_prompt_completion_data_keyed_by_prompt_position(tmp_path):
    out = rows(run(tmp_path))
    prompts = [r["prompt"] for r in load_rows(str(DATA / "domain_train.jsonl")).select(range(10))]
    assert [r["id"] for r in out] == list(range(10))
    assert [r["prompt"] for r in out] == prompts
    assert all(r["completion"].strip() and isinstance(r["finished"], bool) for r in out)
    # ... and distill.data trains on them: loss on the completion (+ EOS) only.
    tok = load_tokenizer(STUDENT)
    data = tokenize(load_rows(str(tmp_path / "out.jsonl")), tok, 64)
    first = data[0]
    n_prompt = len(tok(out[0]["prompt"])["input_ids"])
    assert all(y == IGNORE_INDEX for y in first["labels"][:n_prompt])
    assert all(y != IGNORE_INDEX for y in first["labels"][n_prompt:])


def test_greedy_generation_is_deterministic_and_independent_of_batching(tmp_path):
    """Two runs give the same bytes; a left-padded batch of 4 gives what one prompt at a time gives."""
    a = run(tmp_path, "a.jsonl").read_text()
    b = run(tmp_path, "b.jsonl").read_text()
    single = run(tmp_path, "single.jsonl", batch_size=1).read_text()
    assert a == b
    assert a == single


def test_completion_is_the_models_own_greedy_continuation(tmp_path):
    """Reference: model.generate on the single unpadded prompt, decoded up to EOS."""
    out = rows(run(tmp_path, max_prompts=2))
    model, tok = load_model(TEACHER), load_tokenizer(TEACHER)
    for row in out:
        enc = tok(row["prompt"], return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)[0]
        new = ids[enc["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert row["completion"] == tok.decode(new, skip_special_tokens=True)


class Interrupt(Exception):
    pass


def interrupted_run(tmp_path, monkeypatch, name, after_batches, torn: bytes, **changes):
    """A run killed after ``after_batches`` batches, whose last write was torn mid-line."""
    real, calls = generate.complete, []

    def dies(*args, **kwargs):
        if len(calls) == after_batches:
            raise Interrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "complete", dies)
    with pytest.raises(Interrupt):
        run(tmp_path, name, **changes)
    monkeypatch.setattr(generate, "complete", real)
    path = tmp_path / name
    with path.open("ab") as f:
        f.write(torn)
    return path


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_resume_after_interruption_gives_the_uninterrupted_rows_without_duplicates(tmp_path, monkeypatch, sampling):
    changes = {"do_sample": "true", "temperature": 1.5, "top_p": 0.9, "seed": 7} if sampling else {}
    whole = run(tmp_path, "whole.jsonl", **changes).read_bytes()
    path = interrupted_run(tmp_path, monkeypatch, "resumed.jsonl", 1, b'{"id": 4, "prompt": "Q: Wh', **changes)
    assert not path.read_bytes().endswith(b"\n")
    run(tmp_path, "resumed.jsonl", **changes)
    resumed = path.read_bytes()
    ids = [r["id"] for r in rows(path)]
    assert len(ids) == len(set(ids)) == 10
    assert resumed == whole


def test_resume_keeps_rows_of_a_part_written_batch_and_redoes_only_the_missing_ones(tmp_path, monkeypatch):
    """A file cut in the middle of a batch (rows 0-5 of batches of 4) ends up equal to the whole run."""
    whole = run(tmp_path, "whole.jsonl").read_bytes()
    lines = whole.splitlines(keepends=True)
    cut = b"".join(lines[:6]) + lines[6][:15]  # rows 0-5 complete, row 6 torn
    (tmp_path / "cut.jsonl").write_bytes(cut)
    (tmp_path / "cut.jsonl.settings.yaml").write_bytes((tmp_path / "whole.jsonl.settings.yaml").read_bytes())
    called = []
    real = generate.complete
    monkeypatch.setattr(generate, "complete", lambda *a, **k: called.append(len(a[2])) or real(*a, **k))
    run(tmp_path, "cut.jsonl")
    assert (tmp_path / "cut.jsonl").read_bytes() == whole
    assert called == [4, 2]  # batches 1 (rows 4-7) and 2 (rows 8-9); batch 0 was done


def test_resuming_with_other_settings_is_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match="max_new_tokens: 8 -> 9"):
        run(tmp_path, max_new_tokens=9)


def test_resuming_over_other_prompts_is_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match="prompt file changed"):
        run(tmp_path, prompts=str(DATA / "domain_eval.jsonl"))


def test_chat_prompts_become_conversations_with_the_teachers_answer(tmp_path):
    """`messages` rows lose their reference answer and gain the teacher's; distill.data trains on them."""
    out = rows(run(tmp_path, prompts=str(DATA / "chat_train.jsonl"), chat_template="null", max_prompts=3))
    source = load_rows(str(DATA / "chat_train.jsonl")).select(range(3))["messages"]
    for row, messages in zip(out, source):
        assert row["messages"][:-1] == messages[:-1]
        assert row["messages"][-1]["role"] == "assistant"
    data = tokenize(load_rows(str(tmp_path / "out.jsonl")), load_tokenizer(STUDENT), 256)
    assert all(any(y != IGNORE_INDEX for y in r["labels"]) for r in data)


def test_user_errors_are_value_errors_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="output_file must end in .jsonl"):
        run(tmp_path, "out.json")
    with pytest.raises(ValueError, match="columns"):
        run(tmp_path, prompts=str(DATA / "world.jsonl"))
    with pytest.raises(ValueError, match="need the chat template"):
        run(tmp_path, prompts=str(DATA / "chat_train.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()


def test_tiny_recipe_is_runnable_from_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "g.jsonl"
    generate.run("recipes/tiny_cpu_generate.yaml", ["--output_file", str(out), "--max_prompts", "3"])
    assert len(rows(out)) == 3
