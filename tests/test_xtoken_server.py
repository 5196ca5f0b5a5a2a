"""A served teacher whose tokenizer differs from the student's (``teacher_server`` + distill.xtoken).

The stand-in for vLLM (tests/test_teacher_server_client.py's) answers /tokenize with the teacher's
tokenizer and /v1/completions with prompt log-probabilities computed, as vLLM computes them, from
tiny_models/teacher_xtok: a log-softmax over the model's whole head (640 rows, 600 of them the
tokenizer's), the top n entries by rank plus the actual token's.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from test_teacher_server_client import StandIn

from distill import models, train
from distill.data import Collator, tokenize_pair
from distill.errors import UserError
from distill.flops import forward_flops, model_size
from distill.losses import IGNORE_INDEX, TopKTargets, xtoken_distillation_loss
from distill.models import load_model, load_tokenizer
from distill.teacher import CrossTopK, ModelTeacher, ServedTeacher
from distill.teacher_server import TeacherServer, check_run
from distill.xtoken import build_vocab_map

from conftest import DATA, ROOT, STUDENT, TINY, SlowTokenizer

TEACHER_XTOK = str(TINY / "teacher_xtok")
K = 8


@pytest.fixture(scope="module")
def pair():
    student, teacher = load_tokenizer(STUDENT), load_tokenizer(TEACHER_XTOK)
    return SimpleNamespace(
        student=student, teacher=teacher, vocab_map=build_vocab_map(student, teacher), model=load_model(TEACHER_XTOK)
    )


def scorer(model, prompts_seen: list):
    """vLLM's /v1/completions with ``prompt_logprobs: n`` and ``max_tokens: 1``, computed from ``model``."""

    @torch.no_grad()
    def complete(body):
        n, choices = body["prompt_logprobs"], []
        for i, prompt in enumerate(body["prompt"]):
            prompts_seen.append(prompt)
            log_p = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # the whole head, as vLLM
            row = [None]
            for p in range(1, len(prompt)):
                top = log_p[p - 1].topk(n)
                entry = {
                    str(t): {"logprob": v, "rank": r + 1}
                    for r, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()))
                }
                actual = prompt[p]
                if str(actual) not in entry:
                    rank = int((log_p[p - 1] > log_p[p - 1, actual]).sum()) + 1
                    entry[str(actual)] = {"logprob": log_p[p - 1, actual].item(), "rank": rank}
                row.append(entry)
            choices.append({"index": i, "prompt_logprobs": row})
        return 200, {"choices": choices}

    return complete


@pytest.fixture
def served(pair):
    stand_in = StandIn(pair.teacher, model=TEACHER_XTOK)
    stand_in.prompts = []
    stand_in.complete = scorer(pair.model, stand_in.prompts)
    yield stand_in
    stand_in.close()


def rows(n: int) -> list[dict]:
    with open(DATA / "corpus_train.jsonl") as f:
        return [json.loads(next(f)) for _ in range(n)]


def checked_server(url, pair, teacher_max_length=128) -> TeacherServer:
    """A client checked as `distill train` checks it (check_run's cross-tokenizer branch)."""
    server = TeacherServer(url)
    config = SimpleNamespace(teacher_model_name_or_path=TEACHER_XTOK, teacher_top_k=K, lmbda=0.0, max_new_tokens=0)
    check_run(
        server, config, SimpleNamespace(max_length=64), SimpleNamespace(model_name_or_path=STUDENT), pair.student,
        teacher_tokenizer=pair.teacher, teacher_max_length=teacher_max_length,
    )  # fmt: skip
    return server


class Bill:
    """What the trainer's CostCallback is told of a served batch."""

    def __init__(self):
        self.served = []

    def teacher_served(self, flops, positions, seconds, waited, role="teacher"):
        self.served.append((flops, positions))


def needed_positions(batch) -> list[list[int]]:
    """Per row, the teacher positions some target position is aligned with (what the loss reads)."""
    where, used = batch["alignment"][:, :-1], batch["labels"][:, 1:].ne(IGNORE_INDEX) & batch["alignment"][:, :-1].ge(0)
    return [sorted(set(where[j][used[j]].tolist())) for j in range(len(where))]


@pytest.mark.parametrize("teacher_cut", [None, 24], ids=["whole-rows", "teacher-side-cut-short"])
def test_served_cross_tokenizer_targets_are_the_live_teachers(pair, served, teacher_cut):
    """The server scores the rows' teacher_input_ids at the aligned teacher positions: the same top-k
    ids as the live teacher, and the same log-probabilities up to the mass of the head's 40 padded rows,
    which vLLM's log-softmax covers and the live teacher's (over the tokenizer's 600 ids) does not:
    served = live + log(1 - padded mass), to float32 precision. Cut short, the teacher's side ends right
    after aligned positions, whose distribution the server still gives (one token more is sent)."""
    batch = Collator(pair.student.pad_token_id, teacher_pad_token_id=pair.teacher.pad_token_id)(
        [tokenize_pair(r, pair.student, pair.teacher, 64, teacher_cut) for r in rows(6)]
    )
    needed = needed_positions(batch)
    if teacher_cut:  # the case this parametrisation is for: an aligned position is a cut row's last
        lengths = batch["teacher_attention_mask"].sum(1).tolist()
        assert any(p and p[-1] == n - 1 for p, n in zip(needed, lengths))
    server = checked_server(served.url, pair)
    assert server.vocab == len(pair.teacher) == 600 and server.n == K + 40
    bill = Bill()
    got = ServedTeacher(server, model_size(TEACHER_XTOK), pair.vocab_map, "projected").targets(batch, False, bill)
    want = ModelTeacher(pair.model, pair.vocab_map, "projected", top_k=K).targets(batch, False)
    assert isinstance(got, CrossTopK) and got.method == "projected" and got.alignment is batch["alignment"]
    assert got.targets.ids.shape == want.targets.ids.shape == (6, batch["teacher_input_ids"].shape[1], K)

    mask = torch.zeros(got.targets.tail.shape, dtype=torch.bool)
    for j, positions in enumerate(needed):
        mask[j, positions] = True
    assert mask.sum() > 50
    with torch.no_grad():
        full = pair.model(batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    padded = full.float().log_softmax(-1)[..., 600:].logsumexp(-1).exp()  # (batch, teacher seq)
    assert torch.equal(got.targets.ids[mask], want.targets.ids[mask]) and got.targets.ids[mask].lt(600).all()
    torch.testing.assert_close(
        got.targets.logprobs[mask], want.targets.logprobs[mask] + torch.log1p(-padded[mask])[:, None],
        atol=2e-5, rtol=0,
    )  # fmt: skip
    tail_want = (1 - padded[mask]) * want.targets.tail[mask].exp() + padded[mask]
    torch.testing.assert_close(got.targets.tail[mask].exp(), tail_want, atol=2e-5, rtol=1e-4)

    # The KD loss of every loss across tokenizers: the live teacher's to 1e-5 once its targets carry the
    # padded mass as vLLM's do, and within that mass (5.7e-5 on average here) of the live loss itself.
    as_vllm = TopKTargets(
        want.targets.logprobs + torch.log1p(-padded)[..., None],
        want.targets.ids,
        ((1 - padded) * want.targets.tail.exp() + padded).log(),
    )
    logits = torch.randn(*batch["input_ids"].shape, len(pair.student), generator=torch.Generator().manual_seed(0))
    for method in ("projected", "uld", "hybrid"):
        served_kd, vllm_kd, live_kd = (
            xtoken_distillation_loss(logits, t, batch["alignment"], batch["labels"], pair.vocab_map, method=method).kd
            for t in (got.targets, as_vllm, want.targets)
        )
        assert torch.isfinite(served_kd)
        assert served_kd.item() == pytest.approx(vllm_kd.item(), rel=0, abs=1e-5), method
        assert served_kd.item() == pytest.approx(live_kd.item(), rel=1e-4), method

    # The bill counts what the server ran: each row's teacher tokens up to the one after its last
    # aligned position, never the student's tokens.
    size = model_size(TEACHER_XTOK)
    lengths = [p[-1] + 2 for p in needed if p]
    ((flops, positions),) = bill.served
    assert positions == sum(lengths) == sum(map(len, served.prompts[1:]))  # [0]: the check's probe
    assert positions != int(batch["attention_mask"].sum())
    assert flops == round(sum(forward_flops(size, n, n) for n in lengths))
    assert all(max(p) < len(pair.teacher) for p in served.prompts)


def test_the_check_uses_the_teachers_side_and_tokenizer(pair, served):
    """The longest prompt is the teacher's side of a row plus one token; the server's tokenizer must
    be the teacher's (the student's is another one, and is refused naming whose was expected)."""
    with pytest.raises(UserError, match=r"at most 512 tokens .*may have 601 \(the teacher's side of a row, cut at 600"):
        checked_server(served.url, pair, teacher_max_length=600)
    server = TeacherServer(served.url)
    with pytest.raises(UserError, match="the teacher server's tokenizer is not the student's"):
        server.check(TEACHER_XTOK, pair.student, K, vocab=902, teacher_vocab=640, max_length=64)


def test_distill_train_from_a_served_cross_tokenizer_teacher(tmp_path, pair, served):
    """recipes/tiny_cpu_xtok.yaml's pair with the teacher on the stand-in: no extra key. The run builds
    its vocabulary map, trains with a finite kd_loss, and bills the teacher tokens the server ran."""
    out = tmp_path / "out"
    metrics = train.run(str(ROOT / "recipes" / "tiny_cpu_xtok.yaml"), [
        "--teacher_server", served.url, "--teacher_top_k", str(K), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--max_train_samples", "12", "--eval_dataset", "null", "--eval_fraction", "0",
        "--logging_steps", "1", "--save_steps", "100", "--output_dir", str(out),
    ])  # fmt: skip
    assert metrics["global_step"] == 3 and (out / "vocab_map.safetensors").is_file()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    kd = [h["kd_loss"] for h in history if "kd_loss" in h]
    assert len(kd) == 3 and all(math.isfinite(x) and x > 0 for x in kd)
    report = json.loads((out / "cost_report.json").read_text())
    assert report["teacher_source"] == "server"
    # Every training row was sent once, in the teacher's tokens ([0]: the check's probe).
    sent = served.prompts[1:]
    assert all(max(p) < len(pair.teacher) for p in sent)
    assert report["teacher_server"]["positions"] == sum(map(len, sent)) > 0
    assert report["flops"]["teacher"] == report["teacher_server"]["computed_flops"] > 0
    size = model_size(TEACHER_XTOK)
    assert report["teacher_server"]["computed_flops"] == sum(round(forward_flops(size, len(p), len(p))) for p in sent)


@pytest.mark.parametrize("bad", ["slow teacher tokenizer", "on-policy", "hidden loss"])
def test_bad_cross_tokenizer_input_with_a_server_is_one_clear_error_before_models_load(
    tmp_path, monkeypatch, served, bad
):
    """Refused before any model loads and before the server is asked to score anything."""
    real = models.load_tokenizer
    args, needle = ["--teacher_server", served.url, "--output_dir", str(tmp_path / "out")], ""
    if bad == "slow teacher tokenizer":  # a served teacher's tokenizer: teacher_server.served_tokenizer loads it
        monkeypatch.setattr(
            models,
            "load_tokenizer",
            lambda name: SlowTokenizer(real(name)) if name.endswith("teacher_xtok") else real(name),
        )
        needle = "not a fast tokenizer"
    elif bad == "on-policy":
        args += ["--dataset", str(DATA / "domain_train.jsonl"), "--eval_dataset", "null", "--lmbda", "0.5"]
        needle = "re-tokenised for the teacher"
    else:
        args += ["--hidden_loss_weight", "1.0"]
        needle = "hidden"
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(train.adapters, "load_student", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(UserError, match=needle):
        train.run(str(ROOT / "recipes" / "tiny_cpu_xtok.yaml"), args)
    assert not [path for path, _ in served.calls if path == "/v1/completions"]


def test_a_served_teacher_folder_without_tokenizer_files_must_serve_the_students_tokenizer(tmp_path, pair):
    """A folder with the teacher's config.json only (as a served teacher needs no weights here): no
    tokenizer to align with, so the server's must be the student's. teacher_xtok's is not: refused,
    naming the fix, before any model loads."""
    folder = tmp_path / "teacher_xtok_config"
    folder.mkdir()
    (folder / "config.json").write_text((TINY / "teacher_xtok" / "config.json").read_text())
    stand_in = StandIn(pair.teacher, model=str(folder))
    try:
        with pytest.raises(UserError, match="tokenizer is not the student's.*needs its tokenizer files there"):
            train.run(str(ROOT / "recipes" / "tiny_cpu_xtok.yaml"), [
                "--teacher_server", stand_in.url, "--teacher_model_name_or_path", str(folder),
                "--output_dir", str(tmp_path / "out"),
            ])  # fmt: skip
    finally:
        stand_in.close()
    assert not [path for path, _ in stand_in.calls if path == "/v1/completions"]


def short_xtok_run(tmp_path, name: str, **keys) -> None:
    """`distill train` on recipes/tiny_cpu_xtok.yaml for 3 steps of 4 rows, no held-out data, with ``keys``
    changed; its files in ``tmp_path / name``."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "tiny_cpu_xtok.yaml").read_text())
    recipe |= {
        "teacher_top_k": K, "max_steps": 3, "per_device_train_batch_size": 4, "max_train_samples": 12,
        "eval_dataset": None, "eval_fraction": 0, "logging_steps": 1, "save_steps": 100,
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**recipe, **keys, "output_dir": str(tmp_path / name)}))
    train.run(str(path))


def test_a_served_teacher_among_several_at_weight_one_trains_as_it_does_alone(tmp_path, served):
    """`teachers: [URL, a model]` with weights (1, 0): the losses of the served teacher alone, and its
    bill line is the one-teacher run's server bill (computed FLOPs of the positions it scored)."""
    runs = {
        "one": {"teacher_server": served.url},
        "two": {"teacher_model_name_or_path": None, "teachers": [served.url, str(TINY / "teacher")],
                "teacher_weights": [1.0, 0.0]},
    }  # fmt: skip
    for name, keys in runs.items():
        short_xtok_run(tmp_path, name, **keys)
    history = {n: json.loads((tmp_path / n / "trainer_state.json").read_text())["log_history"] for n in runs}
    assert [h.get("loss") for h in history["two"]] == [h.get("loss") for h in history["one"]]
    one, two = (json.loads((tmp_path / n / "cost_report.json").read_text()) for n in runs)
    served_line, model_line = two["teachers"]
    assert served_line["source"] == "server" and served_line["url"] == served.url
    assert served_line["flops"] == one["teacher_server"]["computed_flops"] > 0
    assert served_line["positions"] == one["teacher_server"]["positions"]
    assert model_line["source"] == "model" and two["flops"]["teacher"] == served_line["flops"] + model_line["flops"]


def test_a_cache_filled_from_a_served_cross_tokenizer_teacher_holds_the_live_teachers_targets(tmp_path, pair, served):
    """`distill cache-teacher` with a `teacher_server` whose tokenizer is not the student's builds the
    cache in the teacher's token space, as from the live teacher: the same rows, positions and top-k ids,
    log-probabilities within the padded head rows' mass (vLLM's log-softmax covers them); its bill is
    computed, not measured; a student trains from it."""
    import numpy as np

    from distill.cli import main

    recipe = str(ROOT / "recipes" / "tiny_cpu_xtok.yaml")
    common = ["--teacher_top_k", str(K), "--max_train_samples", "12", "--eval_dataset", "null", "--eval_fraction", "0"]
    live, remote = tmp_path / "live", tmp_path / "served"
    assert main(["cache-teacher", recipe, "--teacher_cache", str(live), *common]) == 0
    assert main(["cache-teacher", recipe, "--teacher_cache", str(remote), "--teacher_server", served.url, *common]) == 0
    shard = "train/shard-00000"
    a, b = (
        {n: np.load(c / shard / f"{n}.npy") for n in ("ids", "logprobs", "input_ids", "offsets")}
        for c in (live, remote)
    )
    assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["offsets"], b["offsets"])
    assert np.array_equal(a["ids"], b["ids"]) and (b["ids"] < 600).all()
    # vLLM's log-softmax covers the head's 40 padded rows: served = live + log(1 - their mass), row by row.
    padded = []
    with torch.no_grad():
        for e in range(len(a["offsets"]) - 1):
            ids = torch.from_numpy(a["input_ids"][a["offsets"][e] : a["offsets"][e + 1]].astype(np.int64))
            log_p = pair.model(ids[None]).logits[0].float().log_softmax(-1)
            padded.append(log_p[:, 600:].logsumexp(-1).exp())
    shift = torch.log1p(-torch.cat(padded)).numpy()[:, None]
    np.testing.assert_allclose(b["logprobs"], a["logprobs"] + shift, atol=2e-5, rtol=0)
    manifest = json.loads((remote / "manifest.json").read_text())
    assert manifest["identity"]["space"] == "teacher" and manifest["teacher_cost"]["train"]["measured"] is False
    assert manifest["teacher_cost"]["train"]["flops"] > 0

    metrics = train.run(recipe, ["--teacher_cache", str(remote), "--max_steps", "2", "--per_device_train_batch_size", "4",
                                 "--output_dir", str(tmp_path / "out"), "--logging_steps", "1", *common])  # fmt: skip
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert metrics["global_step"] == 2 and all(math.isfinite(h["kd_loss"]) for h in history if "kd_loss" in h)


def test_a_served_teacher_of_weight_zero_is_asked_nothing_in_training(tmp_path, served):
    """`teachers: [URL, a model]` with weights (0, 1): training never reads the served teacher's targets, so
    it asks the server for none (not even one batch ahead) and its bill line is empty, as a served
    teacher's at alpha 0; the server still answers the checks before training."""
    runs = {
        "alpha0": {"teacher_server": served.url, "alpha": 0.0},
        "zero": {"teacher_model_name_or_path": None, "teachers": [served.url, str(TINY / "teacher")],
                 "teacher_weights": [0.0, 1.0]},
    }  # fmt: skip
    asked = {}
    for name, keys in runs.items():
        before = len(served.prompts)
        short_xtok_run(tmp_path, name, **keys)
        asked[name] = len(served.prompts) - before
    assert asked["zero"] == asked["alpha0"]  # the checks' prompts only
    served_line, model_line = json.loads((tmp_path / "zero" / "cost_report.json").read_text())["teachers"]
    assert served_line["flops"] == 0 and served_line["positions"] == 0
    assert model_line["flops"] > 0
