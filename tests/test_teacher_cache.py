"""The offline teacher cache: built once, resumable, refused when it does not match, and training
from it loads no teacher and sees the teacher's targets."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from distill import cache_teacher, teacher_cache, train
from distill.cli import main
from distill.config import DataArguments, DistillConfig
from distill.data import Collator, build_datasets
from distill.errors import UserError
from distill.flops import flop_counter
from distill.losses import IGNORE_INDEX, teacher_topk
from distill.models import load_model, load_tokenizer
from distill.trainer import DistillTrainer

from conftest import DATA, ROOT, STUDENT, TEACHER

K = 8
SHARD = 4  # examples per shard: the small data below makes several shards


def recipe(tmp_path, name="recipe.yaml", **overrides) -> str:
    values = {
        "model_name_or_path": STUDENT,
        "teacher_model_name_or_path": TEACHER,
        "dataset": str(DATA / "corpus_train.jsonl"),
        "eval_dataset": str(DATA / "corpus_eval.jsonl"),
        "max_length": 32,
        "max_train_samples": 14,
        "max_eval_samples": 5,
        "teacher_cache": str(tmp_path / "cache"),
        "teacher_top_k": K,
        "temperature": 2.0,
        "per_device_eval_batch_size": 3,
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": "none",
    } | overrides
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


def arrays(cache_dir) -> dict:
    """Every array of every shard, by relative path."""
    return {str(f.relative_to(cache_dir)): np.load(f) for f in sorted(cache_dir.glob("*/shard-*/*.npy"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("built")
    manifest, path = cache_teacher.build(recipe(tmp), examples_per_shard=SHARD)
    return tmp, manifest, path


def test_cache_holds_the_teachers_topk_targets_of_every_target_position(built):
    """Round trip: the stored targets are teacher_topk of the teacher's logits at each example's
    target positions, at the recipe's temperature, on the shared vocabulary."""
    _, manifest, path = built
    assert manifest["complete"] and manifest["vocab_size"] == 902  # the student's width, < the teacher's 960
    data, _ = build_datasets(
        DataArguments(dataset=str(DATA / "corpus_train.jsonl"), eval_dataset=str(DATA / "corpus_eval.jsonl"),
                      max_length=32, max_train_samples=14, max_eval_samples=5),
        load_tokenizer(STUDENT),
    )  # fmt: skip
    teacher = load_model(TEACHER).eval()
    split = teacher_cache.TeacherCache(path).split("train")
    assert split.examples == len(data) > 2 * SHARD
    for i in (0, SHARD + 1, len(data) - 1):
        ids, labels = torch.tensor([data[i]["input_ids"]]), torch.tensor(data[i]["labels"])
        with torch.no_grad():
            logits = teacher(ids).logits[0, :-1][labels[1:] != IGNORE_INDEX][:, :902]
        expected = teacher_topk(logits, K, temperature=2.0)
        got = split.example(i)
        np.testing.assert_array_equal(got.ids, expected.ids.numpy())
        np.testing.assert_allclose(got.logprobs, expected.logprobs.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.tail, expected.tail.numpy(), rtol=1e-5, atol=1e-5)


def test_build_reports_bytes_per_token_and_the_loss_error(built):
    tmp, manifest, _ = built
    rows = sum(s["rows"] for s in manifest["splits"].values())
    on_disk = sum(f.stat().st_size for f in (tmp / "cache").glob("*/shard-*/*.npy"))
    assert manifest["bytes_per_token"] == pytest.approx(on_disk / rows)
    assert 8 * K + 4 <= manifest["bytes_per_token"] < 8 * K + 4 + 200  # + offsets and .npy headers
    report = manifest["report"]
    assert report["tokens"] > 0 and 0 < report["kd_full"]
    # Top-k merges outcomes, so its KD can only be smaller (data processing), and k = 8 of 902 ids
    # already holds most of a trained teacher's mass.
    assert report["kd_topk"] <= report["kd_full"] + 1e-6
    assert report["kd_rel_error"] == pytest.approx(abs(report["kd_topk"] - report["kd_full"]) / report["kd_full"])
    assert 0.0 < manifest["splits"]["train"]["mean_tail_mass"] < 0.5


def test_an_interrupted_build_resumes_to_the_same_bytes(tmp_path, built, monkeypatch):
    """Killed while writing its third shard (a half-written .tmp left behind), the build leaves an
    incomplete cache that training refuses; run again, it keeps the finished shards, redoes the
    rest, and ends byte-identical to an uninterrupted build."""
    real_write = cache_teacher._write_shard
    written = []

    def dies_on_third(final, *data):
        if len(written) == 2:
            tmp = final.with_name(final.name + ".tmp")
            tmp.mkdir(parents=True)
            (tmp / "logprobs.npy").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        written.append(final)
        real_write(final, *data)

    monkeypatch.setattr(cache_teacher, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher.build(recipe(tmp_path), examples_per_shard=SHARD)
    with pytest.raises(ValueError, match="incomplete"):
        teacher_cache.TeacherCache(str(tmp_path / "cache"))
    mtimes = {f: f.stat().st_mtime_ns for d in written for f in d.iterdir()}

    monkeypatch.setattr(cache_teacher, "_write_shard", real_write)
    manifest, _ = cache_teacher.build(recipe(tmp_path), examples_per_shard=SHARD)
    assert manifest["complete"]
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items()), "finished shards were rewritten"
    assert not list((tmp_path / "cache").glob("*/*.tmp"))
    resumed, uninterrupted = arrays(tmp_path / "cache"), arrays(built[0] / "cache")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert resumed[name].tobytes() == uninterrupted[name].tobytes(), name
    # The teacher's cost counts the shards the first build finished too.
    for split in ("train", "eval"):
        for key in ("flops", "examples"):
            assert manifest["teacher_cost"][split][key] == built[1]["teacher_cost"][split][key], (split, key)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"teacher_top_k": K + 1}, "teacher_top_k"),
        ({"temperature": 1.0}, "temperature"),
        ({"max_train_samples": 13}, "data"),
        ({"max_length": 24}, "max_length"),
        ({"teacher_model_name_or_path": STUDENT}, "teacher"),
    ],
)
def test_a_cache_of_another_run_is_refused_before_any_model_loads(tmp_path, built, monkeypatch, capsys, change, field):
    """`distill train` with a mismatched cache: one clear error naming what differs, exit code 2."""

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the cache was checked")

    monkeypatch.setattr(train, "load_model", no_models)
    monkeypatch.setattr(train.adapters, "load_student", no_models)
    path = recipe(tmp_path, teacher_cache=built[2], **change)
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert "was built for another run" in err and field in err


def test_building_into_a_cache_of_another_run_is_refused(tmp_path, built):
    with pytest.raises(ValueError, match="another run"):
        cache_teacher.build(recipe(tmp_path, teacher_cache=built[2], teacher_top_k=K + 2), examples_per_shard=SHARD)


def test_training_from_the_cache_loads_no_teacher(tmp_path, built, monkeypatch):
    """teacher_cache without teacher_model_name_or_path: only the student is loaded, the run
    trains, logs both loss parts and evaluates agreement against the cached teacher argmax."""
    loaded = []
    real_load = train.load_model

    def spy(path, *args, **kwargs):
        loaded.append(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(train, "load_model", spy)
    path = recipe(tmp_path, teacher_cache=built[2], teacher_model_name_or_path=None, max_steps=3, logging_steps=1,
                  per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)  # fmt: skip
    metrics = train.run(path)
    assert TEACHER not in loaded
    assert metrics["global_step"] == 3
    assert 0.0 <= metrics["eval"]["eval_agreement"] <= 1.0 and metrics["eval"]["eval_kd_loss"] > 0
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert history["train"]["train_loss"] > 0


def test_training_from_the_cache_bills_the_teacher_its_share_of_the_cache_build(tmp_path, built):
    """The teacher ran when the cache was built: the run is billed the build's measured FLOPs for the
    part of the cached examples it read (3 steps x 4 of them), stated as amortised, and that work is
    left out of the run's own FLOP/s."""
    path = recipe(tmp_path, teacher_cache=built[2], teacher_model_name_or_path=None, max_steps=3,
                  per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)  # fmt: skip
    train.run(path)
    report = json.loads((tmp_path / "out" / "cost_report.json").read_text())
    build = built[1]["teacher_cost"]["train"]
    share = 12 / build["examples"]
    assert report["teacher_source"] == "cache"
    assert report["teacher_cache"]["share"] == pytest.approx(share)
    assert report["flops"]["teacher"] == round(build["flops"] * share) > 0
    assert report["flops"]["total"] == report["flops"]["teacher"] + report["flops"]["student"]
    done_here = report["flops_per_second_per_device"] * report["wall_seconds"]
    assert done_here == pytest.approx(report["flops"]["student"])


@pytest.mark.parametrize("restore", [False, True], ids=["kept-callback", "restored-callback"])
def test_a_resumed_run_from_the_cache_still_bills_the_cache(tmp_path, built, restore):
    """With restore_callback_states_from_checkpoint the Trainer rebuilds the cost callback from its
    checkpointed state: the teacher's source is part of it, so the resumed run bills the same share of
    the build as the uninterrupted one (it used to forget the cache and bill no teacher)."""
    common = dict(teacher_cache=built[2], teacher_model_name_or_path=None, per_device_train_batch_size=4,
                  save_steps=2, disable_tqdm=True, restore_callback_states_from_checkpoint=restore)  # fmt: skip
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
    train.run(recipe(tmp_path / "whole", max_steps=4, **common))
    whole = json.loads((tmp_path / "whole" / "out" / "cost_report.json").read_text())
    train.run(recipe(tmp_path / "resumed", max_steps=4, **common,
                     resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-2")))  # fmt: skip
    resumed = json.loads((tmp_path / "resumed" / "out" / "cost_report.json").read_text())
    assert resumed["teacher_source"] == "cache"
    assert resumed["flops"]["teacher"] == whole["flops"]["teacher"] > 0


def test_training_from_the_cache_at_alpha_0_bills_no_teacher(tmp_path, built):
    """alpha 0 is supervised training: the cached targets are read only at evaluation, so the run is
    billed no share of the cache build."""
    path = recipe(tmp_path, teacher_cache=built[2], teacher_model_name_or_path=None, max_steps=2, alpha=0.0,
                  per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)  # fmt: skip
    train.run(path)
    report = json.loads((tmp_path / "out" / "cost_report.json").read_text())
    assert report["teacher_source"] == "none" and "teacher_cache" not in report
    assert report["flops"]["teacher"] == 0
    assert report["flops"]["total"] == report["flops"]["student"] > 0


@pytest.mark.parametrize("chunked", [True, False])
def test_training_on_full_vocabulary_targets_equals_training_with_the_teacher(tmp_path, chunked):
    """With k = the shared vocabulary the cache *is* the teacher: same loss and student gradients
    as the trainer that runs the teacher, on the chunked and on the reference path."""
    _, path = cache_teacher.build(recipe(tmp_path, teacher_top_k=902, max_train_samples=3, max_eval_samples=1))
    cache = teacher_cache.TeacherCache(path)
    collator = teacher_cache.TargetsCollator(Collator(0), cache.k)
    split = cache.split("train")
    data, _ = build_datasets(
        DataArguments(dataset=str(DATA / "corpus_train.jsonl"), max_length=32, max_train_samples=3, eval_fraction=0),
        load_tokenizer(STUDENT),
    )
    batch = collator([{**data[i], "teacher_targets": split.example(i)} for i in range(3)])
    student = load_model(STUDENT)
    results = []
    for teacher in (load_model(TEACHER), None):
        args = DistillConfig(
            output_dir=str(tmp_path / "out"), teacher_model_name_or_path=TEACHER if teacher else None,
            teacher_cache=None if teacher else path, temperature=2.0, alpha=0.5, use_cpu=True, report_to="none",
            measure_cost=False, chunked_loss=chunked,
        )  # fmt: skip
        model = copy.deepcopy(student)
        trainer = DistillTrainer(model=model, teacher=teacher, args=args, data_collator=collator)
        assert trainer._chunked is chunked
        loss = trainer.compute_loss(model, trainer._prepare_inputs(batch), num_items_in_batch=torch.tensor(50))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7)


class Accepted(Exception):
    """Raised in place of loading the student: the run got past every check of the cache."""


def train_until_the_student_loads(monkeypatch, path):
    """`distill train` on the recipe at ``path``: its exit code if it stops before loading the student
    (an error), else Accepted."""

    def accepted(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr(train.adapters, "load_student", accepted)
    monkeypatch.setattr(train, "load_model", accepted)
    return main(["train", path])


def test_a_teacher_changed_in_place_is_refused(tmp_path, monkeypatch, capsys):
    """Same path, other weights (here halved): the cache's targets are not this teacher's."""
    teacher = tmp_path / "teacher"
    shutil.copytree(TEACHER, teacher)
    small = {"teacher_model_name_or_path": str(teacher), "max_train_samples": 4, "max_eval_samples": 2}
    cache_teacher.build(recipe(tmp_path, **small), examples_per_shard=SHARD)
    weights = load_file(teacher / "model.safetensors")
    save_file({name: w * 0.5 for name, w in weights.items()}, teacher / "model.safetensors", metadata={"format": "pt"})
    assert train_until_the_student_loads(monkeypatch, recipe(tmp_path, **small)) == 2
    err = capsys.readouterr().err
    assert "was built for another run" in err and "the teacher's weights or config" in err and str(teacher) in err


def test_a_teacher_run_in_another_dtype_is_refused(tmp_path, built, monkeypatch, capsys):
    path = recipe(tmp_path, teacher_cache=built[2], teacher_dtype="bfloat16")
    assert train_until_the_student_loads(monkeypatch, path) == 2
    err = capsys.readouterr().err
    assert "teacher_dtype (cache: float32, this run: bfloat16; set teacher_dtype: float32 to use this cache)" in err


def test_the_same_teacher_spelled_as_a_relative_path_is_accepted(tmp_path, built, monkeypatch):
    monkeypatch.chdir(ROOT)
    relative = "./" + str(Path(TEACHER).relative_to(ROOT))
    with pytest.raises(Accepted):
        train_until_the_student_loads(
            monkeypatch, recipe(tmp_path, teacher_cache=built[2], teacher_model_name_or_path=relative)
        )


def test_a_teacher_not_on_this_machine_is_accepted_with_a_note(tmp_path, built, monkeypatch, capsys):
    """The cache is what lets training run without the teacher: its absence cannot be held against it."""
    gone = str(tmp_path / "elsewhere" / "teacher")
    with pytest.raises(Accepted):
        train_until_the_student_loads(
            monkeypatch, recipe(tmp_path, teacher_cache=built[2], teacher_model_name_or_path=gone)
        )
    assert f"the teacher could not be checked ({gone} is not a model on this machine)" in capsys.readouterr().out


def test_a_cache_of_an_older_format_is_refused_with_how_to_rebuild_it(tmp_path, built):
    old = tmp_path / "old_cache"
    shutil.copytree(built[2], old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(
        UserError, match="written by another version of distill .format 1.*delete it and build it again"
    ):
        teacher_cache.TeacherCache(str(old))


def test_the_manifest_records_the_teachers_measured_flops_per_split(built):
    """The train split's FLOPs are those FlopCounterMode counts over the same batches (the shards'
    fixed batches, no other forward such as the build's loss report), with its examples and seconds."""
    _, manifest, _ = built
    data, _ = build_datasets(
        DataArguments(dataset=str(DATA / "corpus_train.jsonl"), max_length=32, max_train_samples=14, eval_fraction=0),
        load_tokenizer(STUDENT),
    )
    teacher, collator, batch_size = load_model(TEACHER).eval(), Collator(load_tokenizer(STUDENT).pad_token_id), 3
    expected = 0
    for first in range(0, len(data), SHARD):
        last = min(len(data), first + SHARD)
        for start in range(first, last, batch_size):
            batch = collator([data[i] for i in range(start, min(last, start + batch_size))])
            with flop_counter() as counter:
                cache_teacher.teacher_targets(teacher, batch, K, 2.0, 902)
            expected += counter.get_total_flops()
    cost = manifest["teacher_cost"]["train"]
    assert cost["flops"] == expected > 0
    assert cost["examples"] == len(data) == manifest["splits"]["train"]["examples"]
    assert cost["seconds"] > 0
    assert manifest["teacher_cost"]["eval"]["examples"] == manifest["splits"]["eval"]["examples"]


def test_building_a_cache_does_not_import_the_train_job(tmp_path):
    """distill.train reads caches, so the job that builds one must not need distill.train back
    (an import cycle); checked in a fresh interpreter, on a recipe the build refuses at once."""
    code = (
        "import sys\n"
        "from distill import cache_teacher, teacher_cache\n"
        "try:\n"
        f"    cache_teacher.build({recipe(tmp_path, teacher_cache=None)!r})\n"
        "except teacher_cache.UserError as err:\n"
        "    assert 'set teacher_cache' in str(err), err\n"
        "print('distill.train' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
