"""A teacher cache across tokenizers: built from a teacher whose tokenizer differs from the recipe's
student, it holds the teacher's top-k at the teacher's own positions (the teacher's token space) and
its tokenizer, and trains students of any tokenizer with no teacher on the machine, giving the
targets a live teacher with another tokenizer gives (`CrossTopK`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from distill import cache_teacher, train
from distill.config import DistillConfig
from distill.data import Collator, tokenize_pair
from distill.errors import UserError
from distill.models import load_model, load_tokenizer
from distill.teacher import CachedTeacher, ModelTeacher
from distill.teacher_cache import TargetsCollator, TeacherCache, tokenizer_hash
from distill.trainer import DistillTrainer
from distill.xtoken import build_vocab_map

from conftest import DATA, STUDENT, TINY

TEACHER_XTOK = str(TINY / "teacher_xtok")
K = 16
MAX_LENGTH = 32


def recipe(tmp_path, name="r.yaml", **changes) -> str:
    values = {
        "model_name_or_path": STUDENT, "teacher_model_name_or_path": TEACHER_XTOK,
        "dataset": str(DATA / "corpus_train.jsonl"), "eval_dataset": str(DATA / "corpus_eval.jsonl"),
        "max_train_samples": 16, "max_eval_samples": 4, "max_length": MAX_LENGTH, "teacher_top_k": K,
        "temperature": 2.0, "alpha": 0.5, "teacher_cache": str(tmp_path / "cache"),
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "max_steps": 2, "logging_steps": 1,
        "learning_rate": 3e-3, "use_cpu": True, "output_dir": str(tmp_path / "out"), "report_to": "none",
        "disable_tqdm": True,
    }  # fmt: skip
    values.update(changes)
    path = tmp_path / name
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One cache from teacher_xtok, built with the tiny student in the recipe."""
    tmp = tmp_path_factory.mktemp("xcache")
    manifest, path = cache_teacher.build(recipe(tmp), examples_per_shard=8)
    return tmp, manifest, path


def third_student(folder) -> str:
    """A tiny untrained Llama with a tokenizer neither the teacher nor the tiny student has: a byte-level
    BPE of 400 tokens trained here on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [json.loads(line)["text"] for line in (DATA / "corpus_train.jsonl").read_text().splitlines()]
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    config = AutoConfig.from_pretrained(STUDENT)
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = len(tokenizer), None, 1, 0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_cache_across_tokenizers_is_in_the_teachers_token_space_with_its_tokenizer(built):
    """The manifest says the targets are over the teacher's tokenizer (its hash, not the student's), cut
    at the live teacher's rule (2 x max_length); every teacher position is a row, its token kept."""
    _, manifest, path = built
    teacher = load_tokenizer(TEACHER_XTOK)
    identity = manifest["identity"]
    assert identity["space"] == "teacher" and identity["tokenizer"] == tokenizer_hash(teacher)
    assert identity["tokenizer"] != tokenizer_hash(load_tokenizer(STUDENT))
    assert identity["teacher_max_length"] == 2 * MAX_LENGTH and manifest["vocab_size"] == len(teacher)
    cache = TeacherCache(path)
    assert tokenizer_hash(cache.teacher_tokenizer()) == identity["tokenizer"]
    split = cache.split("train")
    row = json.loads((DATA / "corpus_train.jsonl").read_text().splitlines()[0])
    ids = tokenize_pair(row, load_tokenizer(STUDENT), teacher, MAX_LENGTH, 2 * MAX_LENGTH)["teacher_input_ids"]
    assert split.tokens(0).tolist() == ids and len(split.example(0).tail) == len(ids)


def test_a_cache_built_with_teacher_a_trains_two_students_with_different_tokenizers(built, tmp_path, monkeypatch):
    """The issue's spec: one cache, two students whose tokenizers differ from each other and from the
    teacher's; neither run needs the teacher (its path is not on this machine). The targets reach the
    loss: kd_loss is finite and > 0 (at alpha 0.5, not the labels-only path), and each run saves its
    own vocabulary map."""
    tmp, _, cache = built
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a teacher model loaded"))
    third = third_student(tmp_path / "third")
    assert tokenizer_hash(load_tokenizer(third)) not in {
        tokenizer_hash(load_tokenizer(p)) for p in (STUDENT, TEACHER_XTOK)
    }
    for n, student in enumerate((STUDENT, third)):
        out = tmp_path / f"out-{n}"
        path = recipe(
            tmp_path, model_name_or_path=student, teacher_model_name_or_path=str(tmp_path / "no-teacher-here"),
            teacher_cache=cache, output_dir=str(out),
        )  # fmt: skip
        metrics = train.run(path)
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        kd = [h["kd_loss"] for h in history if "kd_loss" in h]
        assert len(kd) == 2 and all(torch.isfinite(torch.tensor(kd))) and min(kd) > 0
        assert metrics["eval"]["eval_kd_loss"] > 0 and (out / "vocab_map.safetensors").is_file()
        assert metrics["cross_tokenizer"]["train"]["targets"] > 0


@pytest.mark.parametrize("method", ["projected", "uld", "hybrid"])
def test_cached_cross_tokenizer_targets_give_the_live_teachers_loss(built, tmp_path, method):
    """On the same batch, the cache's targets and the live teacher's (top-k of the same k) give the same
    loss, KD and CE, on the reference and on the chunked path, and the same agreement counts."""
    _, _, path = built
    cache = TeacherCache(path)
    student_tok, teacher_tok = load_tokenizer(STUDENT), cache.teacher_tokenizer()
    lines = (DATA / "corpus_train.jsonl").read_text().splitlines()[:6]
    rows = [
        tokenize_pair(json.loads(line), student_tok, teacher_tok, MAX_LENGTH, cache.teacher_max_length)
        for line in lines
    ]
    import datasets

    data = cache.attach("train", datasets.Dataset.from_list(rows))
    collator = TargetsCollator(
        Collator(student_tok.pad_token_id, teacher_pad_token_id=teacher_tok.pad_token_id), K, True
    )
    batch = collator([data[i] for i in range(len(rows))])
    vocab_map = build_vocab_map(student_tok, teacher_tok)
    args = DistillConfig(
        output_dir=str(tmp_path), teacher_model_name_or_path=TEACHER_XTOK, alpha=0.5, temperature=2.0,
        use_cpu=True, report_to="none", teacher_top_k=K, measure_cost=False,
    )  # fmt: skip
    student = load_model(STUDENT)
    live = ModelTeacher(load_model(TEACHER_XTOK).eval(), vocab_map, method, top_k=K)
    cached = CachedTeacher(cache, vocab_map, method)
    results = []
    for source in (live, cached):
        trainer = DistillTrainer(model=student, teacher=source, args=args, processing_class=student_tok)
        for chunked in (True, False):
            trainer._chunked = chunked
            for training in (True, False):
                student.train(training)
                out, _, _, agreement, *_ = trainer._distill(student, batch, None)
                results.append((out, agreement[0] if agreement else None))  # the one teacher's
    assert results[0][0].kd > 0
    for (want, want_agree), (got, got_agree) in zip(results[:4], results[4:]):
        for name in ("loss", "kd", "ce"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-5)
        if want_agree is not None:
            assert [int(x) for x in got_agree] == [int(x) for x in want_agree] and int(want_agree[1]) > 0


def train_until_a_model_loads(monkeypatch, path):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(train.adapters, "load_student", lambda *a, **k: pytest.fail("a model loaded"))
    train.run(path)


def damage(cache, how: str) -> None:
    folder = cache / "teacher_tokenizer"
    if how == "missing":
        shutil.rmtree(folder)
    elif how == "cut short":
        text = (folder / "tokenizer.json").read_text()
        (folder / "tokenizer.json").write_text(text[: len(text) // 2])
    else:  # another tokenizer's files in its place
        shutil.rmtree(folder)
        load_tokenizer(STUDENT).save_pretrained(folder)


@pytest.mark.parametrize(
    "how, needle",
    [("missing", "holds no teacher_tokenizer/"), ("cut short", "does not load"), ("replaced", "not the one the cache")],
)
def test_a_cache_whose_teacher_tokenizer_is_missing_or_damaged_is_refused_before_models_load(
    built, tmp_path, monkeypatch, how, needle
):
    _, _, path = built
    copy = tmp_path / "cache"
    shutil.copytree(path, copy)
    damage(copy, how)
    with pytest.raises(UserError, match=needle):
        train_until_a_model_loads(monkeypatch, recipe(tmp_path))


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"temperature": 1.0}, "temperature"),
        ({"teacher_top_k": 8}, "teacher_top_k"),
        ({"max_length": 48}, "max_length"),
        ({"max_train_samples": 20}, "4 of 20 train rows are not in the cache"),
        ({"eval_dataset": str(DATA / "domain_eval.jsonl")}, "eval rows are not in the cache"),
        ({"lmbda": 0.5, "dataset": str(DATA / "domain_train.jsonl"), "eval_dataset": None}, "on-policy|lmbda"),
    ],
)
def test_a_teacher_space_cache_used_for_another_run_is_refused_before_models_load(
    built, tmp_path, monkeypatch, change, needle
):
    """What still pins a teacher-space cache to its run (the student's tokenizer does not): k, the
    temperature, max_length (the teacher's cut is twice it), and every row trained on being a cached row."""
    _, _, path = built
    with pytest.raises(UserError, match=needle):
        train_until_a_model_loads(monkeypatch, recipe(tmp_path, teacher_cache=path, **change))


def test_a_subset_of_the_cached_rows_trains(built, tmp_path, monkeypatch):
    """Rows are matched on their teacher tokens, so fewer rows than the cache holds (another student may
    keep fewer after its own cut) is no mismatch: checks pass up to the student's loading."""
    _, _, path = built
    with pytest.raises(pytest.fail.Exception, match="a model loaded"):
        train_until_a_model_loads(monkeypatch, recipe(tmp_path, teacher_cache=path, max_train_samples=9))


def test_rebuilding_with_another_student_tokenizer_resumes_the_same_cache(built, tmp_path, monkeypatch):
    """The student's tokenizer is not part of a teacher-space cache's identity: building again with the
    third student finds the cache complete and identical, rewriting no shard and no tokenizer file."""
    tmp, manifest, path = built
    copy = tmp_path / "cache"
    shutil.copytree(path, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file() and p.name != "manifest.json"}
    again, _ = cache_teacher.build(
        recipe(tmp_path, model_name_or_path=third_student(tmp_path / "third"), teacher_cache=str(copy)),
        examples_per_shard=8,
    )
    assert again["identity"] == manifest["identity"] and again["splits"] == manifest["splits"]
    assert {p: p.stat().st_mtime_ns for p in before} == before
