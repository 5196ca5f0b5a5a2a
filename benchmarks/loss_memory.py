"""Peak extra memory and time of the reference and the chunked distillation loss (forward + backward).

Each (path, tokens, vocab) case runs in a fresh Python process so that one case's allocator state
cannot hide or inflate another's. A case is what the trainer does after the two models' bodies:
the student's and teacher's output layers (``hidden @ W^T``) and the loss, forward and backward,
from fp32 hidden states of ``--hidden`` features.

Memory is measured on CPU as the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs just before the measured step) over its resident set before the step. That is
what the operating system had to supply: the quantity that runs out. (torch's CPU memory profiler
counts only its own allocations, and would miss nothing here, but gives events to replay rather than
a peak.) glibc's mmap threshold is fixed at 64 KiB in the cases' processes (see ENV) so that freed
tensors leave the resident set at once, as they would leave a GPU's allocated memory. Two columns: ``extra`` is the whole rise, ``overhead``
subtracts the gradients both paths must return (``W_S.grad`` and ``h_S.grad``), i.e. what the
loss itself costs. Goals use ``overhead``, in units of one fp32 logits tensor (tokens x vocab x 4).

The reference at 8192 x 128256 needs ~10 logits tensors of 4.2 GB; when that does not fit in the
memory available (``--max-gb``), it runs at fewer tokens and its memory and time are scaled
linearly in tokens (they are linear: every tensor involved is tokens x something); the table marks
those rows "scaled from N".

Timings are the fastest of 1 + ``--repeats`` runs after one warm-up (other processes on a shared CPU
only ever add time, so the minimum is the least disturbed figure); cases of 8192 x 32000 and larger
run once, without warm-up (each takes minutes on 2 cores). On a shared CPU expect noise of tens of
percent on single runs; compare ratios within one run rather than across runs.

Last, the whole KD step of the trainer (``--no-step`` skips it): peak memory above the loaded models
and time of one ``DistillTrainer.training_step`` with ``chunked_loss`` false and true.

    python benchmarks/loss_memory.py                      # everything (~15-30 min on 2 shared cores)
    python benchmarks/loss_memory.py --tokens 1024 --vocab 32000 --no-step   # one size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GIB = 2**30
BIG = 2**28  # tokens x vocab from which a case runs once, without warm-up (8192 x 32000 and up)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(path: str, tokens: int, vocab: int, hidden: int, repeats: int, loss_type: str) -> dict:
    """One case in this process: returns extra/overhead bytes and median seconds."""
    import torch

    from distill.chunked import chunked_distillation_loss
    from distill.losses import distillation_loss

    torch.manual_seed(0)
    batch = max(1, tokens // 1024)
    seq = tokens // batch + 1  # + 1: the causal shift leaves `tokens` targets
    h_s = torch.randn(batch, seq, hidden, requires_grad=True)
    w_s = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    h_t = torch.randn(batch, seq, hidden)
    w_t = torch.randn(vocab, hidden) / hidden**0.5
    labels = torch.randint(0, vocab, (batch, seq))
    labels[:, 0] = -100  # a masked position, as a prompt or BOS would be

    def step():
        h_s.grad = w_s.grad = None
        if path == "chunked":
            out = chunked_distillation_loss(h_s, w_s, h_t, w_t, labels, loss_type=loss_type, temperature=2.0)
        else:
            with torch.no_grad():
                t = h_t @ w_t.T
            out = distillation_loss(h_s @ w_s.T, t, labels, loss_type=loss_type, temperature=2.0)
        out.loss.backward()
        return out.loss.item()

    if tokens * vocab < BIG:  # warm-up: thread pools, allocator. A big case's step takes minutes on
        step()  # 2 cores; its one-time costs are lost in it.
        h_s.grad = w_s.grad = None
    else:
        repeats = 0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = step()
    times = [time.perf_counter() - start]
    extra = (_status_kib("VmHWM") - before) * 1024
    grads = (w_s.numel() + h_s.numel()) * 4
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return {"extra": extra, "overhead": extra - grads, "seconds": min(times), "loss": loss}


def run_step(chunked: bool, repeats: int) -> dict:
    """One whole DistillTrainer training step (teacher forward, student forward + backward, loss) on
    the larger random-init pair of benchmarks/step_overhead.py: teacher 8 x 512, student 4 x 256,
    vocabulary 32000, batch 4 x 256."""
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.config import DistillConfig
    from distill.trainer import DistillTrainer

    def llama(layers, width):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
            num_attention_heads=width // 64, num_key_value_heads=width // 64,
        ))  # fmt: skip

    args = DistillConfig(
        output_dir=tempfile.mkdtemp(), teacher_model_name_or_path="random-init", chunked_loss=chunked,
        use_cpu=True, report_to="none", measure_cost=False, temperature=2.0,
    )  # fmt: skip
    student = llama(4, 256)
    trainer = DistillTrainer(model=student, teacher=llama(8, 512), args=args)
    assert trainer._chunked is chunked
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (4, 256), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    tokens = torch.tensor(4 * 255)

    def step():
        student.zero_grad(set_to_none=True)
        return trainer.training_step(student, inputs, tokens).item()

    step()  # warm-up
    student.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = step()
    times = [time.perf_counter() - start]
    extra = (_status_kib("VmHWM") - before) * 1024
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    grads = sum(p.numel() * 4 for p in student.parameters())
    return {"extra": extra, "overhead": extra - grads, "seconds": min(times), "loss": loss}


def reference_peak_estimate(tokens: int, vocab: int) -> float:
    """Bytes the reference path holds at peak, ~10 fp32 logits tensors (measured: see the table)."""
    return 10 * tokens * vocab * 4


def measure(path, tokens, vocab, args) -> dict:
    """Runs one case in a fresh process; scales a reference case down when it would not fit."""
    run_tokens = tokens
    if path == "reference":
        while run_tokens > 1024 and reference_peak_estimate(run_tokens, vocab) > args.max_gb * GIB:
            run_tokens //= 2
    cmd = [sys.executable, __file__, "--one", path, str(run_tokens), str(vocab)]
    cmd += ["--hidden", str(args.hidden), "--repeats", str(args.repeats), "--loss-type", args.loss_type]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=ENV)
    if out.returncode != 0:
        raise RuntimeError(f"{path} {tokens}x{vocab} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if run_tokens != tokens:
        f = tokens / run_tokens
        result["overhead"] *= f
        result["extra"] = result["overhead"] + (vocab + tokens) * args.hidden * 4  # + the gradients
        result["seconds"] *= f
        result["scaled_from"] = run_tokens
    return result


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# glibc keeps freed blocks under its adaptive mmap threshold (up to 32 MB) in the heap, where the
# resident set still counts them; a fixed 64 KiB threshold returns every tensor-sized block on free,
# so the peak resident set follows the peak of live memory rather than the allocator's history.
ENV = os.environ | {"PYTHONPATH": ROOT, "MALLOC_MMAP_THRESHOLD_": "65536"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--hidden", type=int, default=256, help="hidden size of both models' last layer")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after the measured one")
    p.add_argument("--loss-type", default="forward_kl")
    p.add_argument("--max-gb", type=float, default=16.0, help="memory a reference case may use")
    p.add_argument("--one", nargs=3, metavar=("PATH", "TOKENS", "VOCAB"), help=argparse.SUPPRESS)
    p.add_argument("--one-step", choices=["reference", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--no-step", action="store_true", help="skip the whole-training-step rows")
    args = p.parse_args()
    if args.one_step:
        print(json.dumps(run_step(args.one_step == "chunked", args.repeats)))
        return
    if args.one:
        path, tokens, vocab = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(run_case(path, tokens, vocab, args.hidden, args.repeats, args.loss_type)))
        return

    rows = []
    header = f"{'tokens':>6} {'vocab':>7} {'path':>9} {'extra MB':>9} {'overhead MB':>11} {'x logits':>8} {'s':>7}"
    print(header)
    for tokens in args.tokens:
        for vocab in args.vocab:
            logits = tokens * vocab * 4
            case = {}
            for path in ("reference", "chunked"):
                r = measure(path, tokens, vocab, args)
                case[path] = r
                note = f"  (scaled from {r['scaled_from']} tokens)" if "scaled_from" in r else ""
                print(
                    f"{tokens:>6} {vocab:>7} {path:>9} {r['extra'] / 1e6:>9.0f} {r['overhead'] / 1e6:>11.0f} "
                    f"{r['overhead'] / logits:>8.2f} {r['seconds']:>7.2f}{note}",
                    flush=True,
                )
            ref, ch = case["reference"], case["chunked"]
            rows.append({
                "tokens": tokens, "vocab": vocab,
                "reference_overhead_mb": round(ref["overhead"] / 1e6), "chunked_overhead_mb": round(ch["overhead"] / 1e6),
                "chunked_overhead_logits": round(ch["overhead"] / logits, 3),
                "memory_ratio": round(ch["overhead"] / ref["overhead"], 4),
                "reference_s": round(ref["seconds"], 3), "chunked_s": round(ch["seconds"], 3),
                "speedup": round(ref["seconds"] / ch["seconds"], 2),
                "reference_scaled_from": ref.get("scaled_from"),
                "loss_rel_diff": abs(ref["loss"] - ch["loss"]) / abs(ref["loss"]) if "scaled_from" not in ref else None,
            })  # fmt: skip
    step = {}
    if not args.no_step:
        print("\nwhole KD step, random-init teacher 8x512 / student 4x256, vocab 32000, batch 4x256:")
        for path in ("reference", "chunked"):
            cmd = [sys.executable, __file__, "--one-step", path, "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=ENV)
            if out.returncode != 0:
                raise RuntimeError(f"step {path} failed:\n{out.stderr[-3000:]}")
            step[path] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {path:>9}: peak {step[path]['extra'] / 1e6:.0f} MB above the models (of which "
                  f"{step[path]['overhead'] / 1e6:.0f} MB beyond the student's gradients), {step[path]['seconds']:.2f} s")  # fmt: skip
    goals = {}
    for r in rows:
        if (r["tokens"], r["vocab"]) == (1024, 32000):
            goals["chunked_le_one_logits_at_1024x32000"] = r["chunked_overhead_logits"] <= 1.0
        if (r["tokens"], r["vocab"]) == (8192, 128256):
            goals["chunked_le_eighth_of_reference_at_8192x128256"] = r["memory_ratio"] <= 1 / 8
    goals["chunked_no_slower"] = all(r["speedup"] >= 1.0 for r in rows)
    step = {path: {"peak_mb": round(r["extra"] / 1e6), "seconds": round(r["seconds"], 3)} for path, r in step.items()}
    print(json.dumps({"benchmark": "loss_memory", "hidden": args.hidden, "loss_type": args.loss_type,
                      "rows": rows, "step": step, "goals": goals}))  # fmt: skip


if __name__ == "__main__":
    main()
