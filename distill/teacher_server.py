"""A teacher served by vLLM: its top-k targets over HTTP (``teacher_server: URL``).

The teacher runs in its own process, on its own GPUs or machines, under vLLM's OpenAI-compatible
server (``vllm serve TEACHER --max-logprobs N``); the trainer holds no teacher weights. For a batch,
each row's token ids go to ``POST /v1/completions`` with ``prompt_logprobs: N`` and ``max_tokens: 1``.
For every position p >= 1 of a prompt vLLM answers the N most likely ids of the distribution that
predicts token p, with their log-probabilities (and the actual token's, when it is not among them).
Position p's answer is the target of the logits at p - 1, so the answers become the same
:class:`distill.losses.TopKTargets` a teacher cache holds, and the top-k loss, its chunked twin and
the metrics read them unchanged.

vLLM's limits, and what distill does where they bite:

- Prompt log-probabilities are the model's raw log-softmax: T = 1, whatever the request's
  temperature. Top-k log-probabilities cannot be re-tempered (the tail's mass at another T depends on
  the logits that were dropped), so a recipe with ``temperature`` != 1 is refused.
- N is capped by the server's ``--max-logprobs`` (vLLM's default: 20), fixed when it starts. The
  check before training asks for N and, when refused, says which ``--max-logprobs`` to restart with.
- The log-softmax covers the teacher's whole output layer. Where it is wider than the student's
  (embedding padding), the targets are the k most likely ids the student also has, and the mass of
  the extra ids goes to the tail. (A cache normalises over the shared ids instead: the two differ by
  that mass, 1.5e-4 on average for the tiny pair.) N = k is asked first; a prompt with a position
  where some of the extra ids are among the top k is asked again with N = k + the extra ids, which
  always holds k shared ids: so the server must allow that N.
- vLLM returns log-probabilities in float32: a tail mass below about 1e-7 is not resolved, and is
  floored at 1e-9 so that no target is exactly impossible.

A teacher with another tokenizer than the student's (distill.xtoken) is served the same way: the
server's tokenizer must then be the one of ``teacher_model_name_or_path`` (its tokenizer files are
read here, its weights need not be), each row carries the teacher's own tokenisation
(``teacher_input_ids``) and the ``alignment``, and the server scores the teacher's ids at the teacher
positions some target position is aligned with. The shared ids are then the teacher tokenizer's:
a head padded beyond it is handled as above, its ids never among the targets. The targets lie on
the teacher's positions and become ``CrossTopK`` (distill.teacher.ServedTeacher).

Faults: a server that cannot be reached when a run starts is a :class:`UserError`, before any model
loads. Mid-run, a refused connection, a timeout or a 5xx answer is retried with exponential backoff;
when the retries are spent, or at once for an answer that is not what vLLM sends, it is a
:class:`ServerError`: the run stops, and its checkpoints stay as they were. Once one request has spent
its retries the client gives up on the server: every other request fails at once, and the requests
run on daemon threads, so that none keeps a stopped run's process alive.

Speed: at k = 64 a batch of 8 x 2048 tokens is answered with about 80 MB of JSON. It is read with
orjson and the top k of every position picked at once over flat numpy arrays (``topk_all``); the
per-position ``topk`` is the reference, and says what is wrong where the fast path finds anything
amiss. benchmarks/teacher_server.py times it.
"""

from __future__ import annotations

import http.client
import math
import os
import queue
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import Future
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson
import torch

from distill.errors import ServerError, UserError
from distill.flops import ModelSize, forward_flops
from distill.losses import IGNORE_INDEX, TopKTargets
from distill.xtoken import aligned_teacher_positions

MIN_TAIL = 1e-9  # floor of the tail mass: float32 log-probabilities do not resolve less
_TOKENIZER_CHUNK = 20_000  # characters per /tokenize request of the tokenizer check


class _Transient(Exception):
    """A failure worth retrying: no connection, a timeout, a 5xx answer."""


class _Threads:
    """``workers`` daemon threads running submitted calls, each answered by a Future.

    Not a ThreadPoolExecutor: the interpreter joins those at exit, so a request still retrying a dead
    server ((retries + 1) x timeout + the backoff: 6.5 minutes by default) held the process of a
    stopped run open. Daemon threads are not waited for at exit; the CLI lets them end the call in
    hand first (`finish_requests`), for a bounded time.
    """

    def __init__(self, workers: int):
        self.queue = queue.SimpleQueue()
        self.finished = False  # finish() was called: its threads end, it takes no more calls
        self.threads = [
            threading.Thread(target=self._work, daemon=True, name="distill-server-request") for _ in range(workers)
        ]
        for thread in self.threads:
            thread.start()
        _ALL_THREADS.add(self)

    def _work(self):
        while True:
            item = self.queue.get()
            if item is None:  # finish_requests: no more work
                return
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # noqa: BLE001 - the Future hands it to whoever waits
                    future.set_exception(err)
            del future, fn, args

    def submit(self, fn, *args) -> Future:
        future = Future()
        self.queue.put((future, fn, args))
        return future

    def finish(self, deadline: float) -> None:
        """Let each thread end its call in hand and stop, waiting until ``deadline`` (perf_counter)."""
        self.finished = True
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.perf_counter()))

    def map(self, fn, items) -> list:
        """``[fn(x) for x in items]``, run on the threads; the first error in order is raised, and the
        calls not started yet are dropped."""
        futures = [self.submit(fn, x) for x in items]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()


_ALL_THREADS: weakref.WeakSet[_Threads] = weakref.WeakSet()


def finish_requests(timeout: float = 10.0) -> None:
    """Before the interpreter exits: let every request thread end the call in hand (a stopped run's
    requests fail at once, the server being given up). A daemon thread still inside torch while the
    interpreter tears torch down aborts the process ("terminate called without an active exception")
    instead of exiting with the run's own code."""
    deadline = time.perf_counter() + timeout
    for pool in list(_ALL_THREADS):
        pool.finish(deadline)


class Scored(NamedTuple):
    """A batch scored by the server: targets at its target positions, and what the server did."""

    targets: TopKTargets  # (batch, seq, k) / (batch, seq) on the positions of the ids sent; zeros off target
    lengths: list[int]  # tokens of each prompt sent (the teacher's): the positions the server ran its model on
    seconds: float  # wall time of the requests

    def flops(self, size: ModelSize) -> int:
        """What the server computed, from the teacher's size: a forward over each prompt sent, with
        attention over the whole prompt at every position (the convention of the measured FLOPs)."""
        return round(sum(forward_flops(size, n, n) for n in self.lengths))


class VLLMServer:
    """HTTP to one vLLM OpenAI-compatible server: JSON requests, retried when the server is away.

    ``retries`` failed attempts are retried after 1, 2, 4, ... x ``backoff`` seconds; up to four
    requests run at a time (vLLM batches concurrent requests itself).
    """

    KEY = "teacher_server"  # the recipe key that names the server, for messages
    ROLE = "the teacher server"
    START = "start the teacher there with `vllm serve TEACHER --max-logprobs K` (see README, Teacher on a server)"

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 5, batch_size: int = 8, backoff=1.0):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"{self.KEY} must be an http:// or https:// URL, got {url!r}")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.timeout, self.retries, self.batch_size, self.backoff = timeout, retries, batch_size, backoff
        self.model: str | None = None  # the served model's id, once checked
        self._pools: dict[int, tuple[_Threads, _Threads]] = {}
        self._gave_up: str | None = None  # why, once a request has spent its retries

    def __getstate__(self):
        # DataLoader workers get a copy: thread pools do not cross processes.
        return {**self.__dict__, "_pools": {}}

    def _pool(self, which: int) -> _Threads:
        # Per process: a pool made before a DataLoader worker forked has no threads in the worker.
        pools = self._pools.get(os.getpid())
        if pools is None or any(pool.finished for pool in pools):
            pools = self._pools[os.getpid()] = (_Threads(4), _Threads(1))
        return pools[which]

    # -- HTTP

    def _once(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(
            self.url + path,
            data=data,
            headers={"Content-Type": "application/json"},
            method="GET" if data is None else "POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as err:
            message = _error_message(err)
            if err.code >= 500:
                raise _Transient(f"HTTP {err.code}: {message}") from err
            raise ServerError(f"{self.ROLE} at {self.url} refused {path} (HTTP {err.code}): {message}") from err
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            raise _Transient(str(getattr(err, "reason", None) or err) or type(err).__name__) from err
        if not raw.strip():  # vLLM's /collective_rpc answers a method that returns nothing with no body
            return {}
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise ServerError(f"{self.ROLE} at {self.url} answered {path} with something that is not JSON") from err

    def _call(self, path: str, body: dict) -> dict:
        """``_once`` with retries: 1, 2, 4, ... x backoff seconds apart. Once any request has spent its
        retries, the server is given up on: the run stops, and the requests still queued or retrying
        fail at their next attempt instead of spending their own retries on a dead server."""
        started = time.perf_counter()
        for attempt in range(self.retries + 1):
            if self._gave_up is not None:
                raise ServerError(self._gave_up)
            try:
                return self._once(path, body)
            except _Transient as err:
                last = err
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        self._gave_up = (
            f"{self.ROLE} at {self.url} did not answer after {self.retries + 1} attempts over "
            f"{time.perf_counter() - started:.0f} s (last: {last})"
        )
        raise ServerError(self._gave_up)

    def models(self) -> list[dict]:
        """What the server serves (``GET /v1/models``), in one attempt: at start, no answer is a UserError."""
        try:
            listed = self._once("/v1/models", timeout=min(self.timeout, 10.0))
        except (_Transient, ServerError) as err:
            raise UserError(f"{self.KEY} {self.url} does not answer ({err}); {self.START}, or fix the URL") from None
        models = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(models, list) or not models:
            raise UserError(f"{self.KEY} {self.url}: /v1/models lists no model; is it a vLLM server?")
        return models

    def serving(self, name: str, how: str) -> dict:
        """The /v1/models entry of ``name``; a UserError naming what the server serves instead."""
        models = self.models()
        served = next((m for m in models if _same_model(m, name)), None)
        if served is None:
            names = ", ".join(str(m.get("id")) for m in models)
            raise UserError(f"{self.KEY} {self.url} serves {names}, not {name}: {how}")
        self.model = served["id"]
        return served


class TeacherServer(VLLMServer):
    """The teacher on a vLLM server. ``check`` before training; then ``score`` (or ``submit``) batches
    (``batch_size`` rows per request)."""

    def __init__(self, url: str, **kw):
        super().__init__(url, **kw)
        self.k = self.n = self.vocab = self.teacher_vocab = None  # n: the most log-probs ever asked

    @classmethod
    def of_recipe(cls, config) -> TeacherServer:
        """The recipe's ``teacher_server``, checked to answer: if it does not, a UserError now, before
        anything else is loaded."""
        server = cls(
            config.teacher_server, timeout=config.teacher_server_timeout, retries=config.teacher_server_retries,
            batch_size=config.teacher_server_batch_size,
        )  # fmt: skip
        server.models()
        return server

    # -- checks before training

    def check(
        self, teacher: str, tokenizer, k: int, vocab: int, teacher_vocab: int, max_length: int, *,
        whose: str = "the student's", sent: str = "",
    ) -> None:  # fmt: skip
        """UserError unless the server serves ``teacher``, with ``tokenizer`` (``whose``: the student's,
        or across tokenizers the teacher's), for prompts of ``max_length`` tokens (``sent`` says what
        they are), and answers ``k`` log-probabilities over the shared ``vocab`` ids per position."""
        served = self.serving(
            teacher, f"the recipe's teacher. Start it with `vllm serve {teacher}`, or set teacher_model_name_or_path "
            "to the model it serves",
        )  # fmt: skip
        limit = served.get("max_model_len")
        if isinstance(limit, int) and max_length > limit:
            raise UserError(
                f"teacher_server {self.url} serves sequences of at most {limit} tokens (its --max-model-len) and "
                f"this run's may have {max_length}{sent}: restart it with --max-model-len {max_length}, or lower "
                "max_length"
            )
        self._check_tokenizer(tokenizer, whose)
        self.k, self.vocab, self.teacher_vocab = k, vocab, teacher_vocab
        # Enough that k shared ids are always among the answer.
        self.n = k + max(teacher_vocab - vocab, 0)
        probe = tokenizer("The teacher server check.", add_special_tokens=False)["input_ids"][:4]
        try:
            answer = self._once("/v1/completions", self._body([probe], self.n))
        except _Transient as err:
            raise UserError(f"teacher_server {self.url} does not answer a scoring request ({err})") from None
        except ServerError as err:
            extra = f" = teacher_top_k {k} + {self.n - k} ids of the teacher's padded vocabulary" if self.n > k else ""
            raise UserError(
                f"teacher_server {self.url} will not return {self.n} log-probabilities per position{extra} ({err}); "
                f"restart it with --max-logprobs {self.n}, or lower teacher_top_k"
            ) from None
        try:
            for entry in self._rows(answer, [probe])[0][1:]:
                self.topk(entry, self.n)
        except ServerError as err:
            raise UserError(f"teacher_server {self.url}: {err}") from None

    def _check_tokenizer(self, tokenizer, whose: str) -> None:
        """The server's tokenizer must be ``tokenizer``: both tokenize the text of its whole vocabulary
        (every id decoded, specials included) into the same ids."""
        text = tokenizer.decode(list(range(len(tokenizer))), skip_special_tokens=False)
        for start in range(0, len(text), _TOKENIZER_CHUNK):
            chunk = text[start : start + _TOKENIZER_CHUNK]
            ours = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            try:
                theirs = self._once("/tokenize", {"model": self.model, "prompt": chunk, "add_special_tokens": False})
            except (_Transient, ServerError) as err:
                raise UserError(f"teacher_server {self.url}: its /tokenize failed ({err})") from None
            theirs = theirs.get("tokens") if isinstance(theirs, dict) else None
            if theirs != ours:
                at = next(
                    (i for i, (a, b) in enumerate(zip(ours, theirs or [])) if a != b), min(len(ours), len(theirs or []))
                )
                raise UserError(
                    f"the teacher server's tokenizer is not {whose}: the text of {whose} vocabulary tokenizes "
                    f"differently (at token {at}: ours {ours[at : at + 3]}, server {(theirs or [])[at : at + 3]}). "
                    "Serve the teacher with its own tokenizer (no --tokenizer), or set teacher_model_name_or_path "
                    "to the files of the model and tokenizer it serves (a teacher with another tokenizer than the "
                    "student's needs its tokenizer files there)"
                )

    # -- scoring

    def _body(self, prompts: list[list[int]], n: int) -> dict:
        return {"model": self.model, "prompt": prompts, "max_tokens": 1, "prompt_logprobs": n, "temperature": 1.0}

    def prompt_logprobs(self, prompts: list[list[int]], n: int) -> list[list]:
        """vLLM's ``prompt_logprobs`` (top ``n``) of each prompt, ``batch_size`` prompts per request."""
        chunks = [prompts[i : i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]
        answers = self._pool(0).map(
            lambda chunk: self._rows(self._call("/v1/completions", self._body(chunk, n)), chunk), chunks
        )
        return [row for answer in answers for row in answer]

    def _rows(self, answer: dict, prompts: list[list[int]]) -> list[list]:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise self._malformed(
                f"{len(choices) if isinstance(choices, list) else 'no'} choices for {len(prompts)} prompts"
            )
        rows = [c.get("prompt_logprobs") for c in sorted(choices, key=lambda c: c.get("index", 0))]
        for row, prompt in zip(rows, prompts, strict=True):
            if not isinstance(row, list) or len(row) != len(prompt):
                raise self._malformed(
                    f"prompt_logprobs of {len(row) if isinstance(row, list) else 'no'} positions for a prompt of {len(prompt)}"
                )
        return rows

    def _malformed(self, what: str) -> ServerError:
        return ServerError(
            f"{self.ROLE} at {self.url} sent an answer that is not vLLM's prompt log-probabilities ({what}); "
            "no target was made from it. Serve the teacher with vLLM's OpenAI-compatible server (vllm serve)"
        )

    def topk(self, entry, n: int) -> tuple[list[float], list[int], float] | None:
        """(log-probs, ids, log tail mass) of the k most likely shared ids in one position's answer to
        a request for ``n``; None if fewer than k of them are shared ids and more may be asked.

        The reference for ``topk_all``, and what explains a malformed answer."""
        if not isinstance(entry, dict) or not entry:
            raise self._malformed(f"a position without log-probabilities: {entry!r}"[:200])
        kept = []
        for key, value in entry.items():
            try:
                token, logprob, rank = int(key), float(value["logprob"]), value.get("rank")
            except (TypeError, ValueError, KeyError):
                raise self._malformed(f"entry {key!r}: {value!r}"[:200]) from None
            if not 0 <= token < self.teacher_vocab or math.isnan(logprob) or logprob > 1e-3:
                raise self._malformed(f"id {token} with log-probability {logprob} (vocabulary {self.teacher_vocab})")
            if (rank is None or rank <= n) and token < self.vocab:
                kept.append((logprob, token))
        if len(kept) < self.k and n < self.n:
            return None
        if len(kept) < self.k:
            raise self._malformed(f"{len(kept)} log-probabilities of shared ids where {self.k} were asked for")
        kept.sort(key=lambda pair: -pair[0])
        logprobs, ids = zip(*kept[: self.k])
        mass = math.fsum(math.exp(lp) for lp in logprobs)
        if mass > 1.0 + 1e-3:
            raise self._malformed(f"top-{self.k} probabilities that sum to {mass:.6f}")
        return list(logprobs), list(ids), math.log(max(1.0 - mass, MIN_TAIL))

    def topk_all(self, entries: list, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``topk`` of every position's answer at once (P >= 1 of them): (log-probs (P, k), ids (P, k), log
        tail mass (P,)), or None if some position has fewer than k shared ids and more may be asked.

        One pass over flat arrays of all P positions' entries instead of a Python loop per entry. Anything
        the checks would refuse (or a type they do not expect) sends the positions through ``topk``,
        which raises the same error naming the entry; so both paths accept and refuse the same answers.
        The top k are sorted by log-probability within each position (stable, as ``topk``'s sort); the
        tail is log(max(1 - sum_i exp(logprob_i), MIN_TAIL)) as in ``topk``, summed in float64 rather
        than exactly (``math.fsum``): a difference below 1e-15, far under float32's resolution.
        """
        try:
            if not all(type(entry) is dict for entry in entries):
                raise TypeError
            counts = np.fromiter(map(len, entries), np.int64, len(entries))
            total = int(counts.sum())
            values = list(chain.from_iterable(map(dict.values, entries)))
            ids = np.fromiter(map(int, chain.from_iterable(entries)), np.int64, total)
            logprobs = np.fromiter(map(itemgetter("logprob"), values), np.float64, total)
            ranks = np.fromiter(map(itemgetter("rank"), values), np.float64, total)  # null -> NaN
        except (TypeError, ValueError, KeyError, OverflowError):
            return self._topk_each(entries, n)
        # `not <=` also catches NaN; an empty position has no entries to flag, hence counts.
        if not counts.all() or ((ids < 0) | (ids >= self.teacher_vocab) | ~(logprobs <= 1e-3)).any():
            return self._topk_each(entries, n)
        keep = (np.isnan(ranks) | (ranks <= n)) & (ids < self.vocab)
        kept = np.bincount(np.repeat(np.arange(len(entries)), counts)[keep], minlength=len(entries))
        if (kept < self.k).any():
            return None if n < self.n else self._topk_each(entries, n)
        # Row i: position i's kept entries in the answer's order, padded with +inf; sorted row by row.
        position = np.repeat(np.arange(len(entries)), kept)
        slot = np.arange(len(position)) - (np.cumsum(kept) - kept)[position]
        minus = np.full((len(entries), kept.max()), np.inf)
        minus[position, slot] = -logprobs[keep]
        table = np.zeros(minus.shape, np.int64)
        table[position, slot] = ids[keep]
        order = np.argsort(minus, axis=1, kind="stable")[:, : self.k]  # padding after equal keys: stable
        logprobs, ids = -np.take_along_axis(minus, order, 1), np.take_along_axis(table, order, 1)
        mass = np.exp(logprobs).sum(1)
        if (mass > 1.0 + 1e-3).any():
            return self._topk_each(entries, n)
        return logprobs, ids, np.log(np.maximum(1.0 - mass, MIN_TAIL))

    def _topk_each(self, entries: list, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``topk_all`` through ``topk``, position by position: raises what is wrong with the answer."""
        found = [self.topk(entry, n) for entry in entries]
        if None in found:
            return None
        logprobs, ids, tails = zip(*found)
        return np.array(logprobs), np.array(ids), np.array(tails)

    def score(self, batch: dict, every_position: bool = False) -> Scored:
        """Top-k targets of a right-padded batch at the positions the loss reads (``every_position``: at
        every position of each row, as a cache in the teacher's token space keeps them); each prompt is
        sent up to the token after its last such position.

        One tokenizer: the rows' ``input_ids``, at the positions p with ``labels[p + 1] != -100``. A
        teacher with another tokenizer (rows of `distill.data.tokenize_pair`: ``teacher_input_ids``,
        ``teacher_attention_mask``, ``alignment``): the teacher's ids, at the teacher positions some
        target position is aligned with, as `distill.teacher.ModelTeacher` scores them; the targets
        are then (batch, teacher seq, k)."""
        started = time.perf_counter()
        labels = batch["labels"].cpu()
        if "alignment" in batch:
            ids = batch["teacher_input_ids"].cpu()
            wanted = aligned_teacher_positions(batch["alignment"].cpu(), labels, ids.shape[1])
        else:
            ids = batch["input_ids"].cpu()
            wanted = batch["attention_mask"].cpu().bool() if every_position else labels[:, 1:].ne(IGNORE_INDEX)
        sent, where = [], []
        for j in range(len(ids)):
            positions = wanted[j].nonzero().squeeze(1).tolist()
            if positions:
                prompt = ids[j, : positions[-1] + 2].tolist()
                if len(prompt) == positions[-1] + 1:
                    # The teacher's side was cut right after its last aligned position. The distribution
                    # there depends on tokens 0..p alone, so any next token gets it from vLLM: the last
                    # one again.
                    prompt.append(prompt[-1])
                sent.append(prompt)
                where.append((j, positions))
        rows = self.prompt_logprobs(sent, self.k) if sent else []
        b, width = ids.shape
        logprobs, out_ids, tail = (
            np.zeros((b, width, self.k), np.float32),
            np.zeros((b, width, self.k), np.int64),
            np.zeros((b, width), np.float32),
        )
        for i, ((j, positions), row) in enumerate(zip(where, rows, strict=True)):
            found = self.topk_all([row[p + 1] for p in positions], self.k)
            if found is None:  # ids beyond the shared vocabulary among the top k: ask for more
                row = self.prompt_logprobs([sent[i]], self.n)[0]
                found = self.topk_all([row[p + 1] for p in positions], self.n)
                sent.append(sent[i])  # the server ran this prompt twice
            logprobs[j, positions], out_ids[j, positions], tail[j, positions] = found
        targets = TopKTargets(torch.from_numpy(logprobs), torch.from_numpy(out_ids), torch.from_numpy(tail))
        return Scored(targets, [len(s) for s in sent], time.perf_counter() - started)

    def submit(self, batch: dict, every_position: bool = False) -> Future:
        """``score(batch)`` in a background thread: the request runs while the trainer works."""
        return self._pool(1).submit(self.score, batch, every_position)


def check_run(
    server: TeacherServer, config, data_args, model_args, tokenizer, teacher_tokenizer=None,
    teacher_max_length: int | None = None,
) -> ModelSize:  # fmt: skip
    """Check the teacher server against the run before any model loads (distill.teacher_server); the
    teacher's size, from its config, for the bill of what the server computes.

    With ``teacher_tokenizer`` (the teacher's differs from the student's, distill.xtoken) the server
    must tokenize as it does and is sent the teacher's side of each row, cut at
    ``teacher_max_length`` (`distill.data.teacher_length`), plus at most one token; its log-probs
    are over that tokenizer's ids."""
    from transformers import AutoConfig

    from distill.flops import model_size
    from distill.models import resolve

    def head_width(name: str) -> int:
        where, gguf_file = resolve(name)
        return AutoConfig.from_pretrained(where, gguf_file=gguf_file).get_text_config().vocab_size

    teacher = config.teacher_model_name_or_path
    size = model_size(teacher)
    teacher_width = head_width(teacher)
    if teacher_tokenizer is None:
        student_width = head_width(model_args.model_name_or_path)
        longest = data_args.max_length + (config.max_new_tokens if config.lmbda > 0 else 0)
        server.check(
            teacher, tokenizer, config.teacher_top_k, min(student_width, teacher_width), teacher_width, longest
        )
    else:
        server.check(
            teacher, teacher_tokenizer, config.teacher_top_k, len(teacher_tokenizer), teacher_width,
            teacher_max_length + 1, whose=f"the teacher's ({teacher})",
            sent=f" (the teacher's side of a row, cut at {teacher_max_length} tokens, and one more)",
        )  # fmt: skip
    return size


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def served_tokenizer(name: str):
    """The served teacher's tokenizer, from the files of ``teacher_model_name_or_path`` (no weights are
    read), or None for a local folder with none (its config.json only): the server's tokenizer must
    then be the student's, which `TeacherServer.check` tests."""
    from distill.models import load_tokenizer, resolve

    where, gguf_file = resolve(name)
    folder = Path(where)
    if not gguf_file and folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    return load_tokenizer(name)


def _same_model(served: dict, teacher: str) -> bool:
    """Whether a /v1/models entry is ``teacher``: the same name, or the same local directory."""
    names = {served.get("id"), served.get("root")} - {None}
    if teacher in names:
        return True
    here = Path(teacher).expanduser()
    return here.exists() and any(Path(str(n)).exists() and Path(str(n)).resolve() == here.resolve() for n in names)


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = orjson.loads(err.read())
        return str(body.get("error", {}).get("message") or body.get("message") or body)
    except Exception:
        return err.reason or ""


class ServedTargetsCollator:
    """Wraps a collator: each batch leaves with its request to the teacher server already sent
    (``teacher_request``, a Future of :class:`Scored`). accelerate's dataloader collates one batch
    ahead of the one in training, so the server scores the next batch while the student trains on
    this one. In a DataLoader worker process the batch is scored there and carries its ``Scored``, or
    the ServerError that scoring raised: torch would re-raise one escaping the worker in the main
    process, wrapped and outside the training step, without the trainer's advice on how to resume."""

    def __init__(self, collator, server: TeacherServer):
        self.collator, self.server = collator, server

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collator(rows)
        if torch.utils.data.get_worker_info() is not None:
            return {**batch, "teacher_request": _Done(self.server, batch)}
        return {**batch, "teacher_request": self.server.submit(batch)}


class _Done:
    """A request made at once, with a Future's ``result`` (a Future does not pickle across processes):
    the ``Scored`` batch, or the ServerError raised where the trainer reads it, as a Future's would be."""

    def __init__(self, server: TeacherServer, batch: dict):
        try:
            self.scored, self.error = server.score(batch), None
        except ServerError as err:
            self.scored, self.error = None, err

    def result(self) -> Scored:
        if self.error is not None:
            raise self.error
        return self.scored
