"""Peak extra memory and time of the reference and the chunked distillation loss (forward + backward).

Each (path, tokens, vocab) case runs in a fresh Python process so that one case's allocator state
cannot hide or inflate another's. A case is what the trainer does after the two models' bodies:
the student's and teacher's output layers (``hidden @ W^T``) and the loss, forward and backward,
from fp32 hidden states of ``--hidden`` features.

Memory is measured on CPU as the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs just before the measured step) over its resident set before the step. That is
what the operating system had to supply, allocator slack included: the quantity that runs out.
(torch's CPU memory profiler counts only its own allocations, and would miss nothing here, but
gives events to replay rather than a peak.) Two columns: ``extra`` is the whole rise, ``overhead``
subtracts the gradients both paths must return (``W_S.grad`` and ``h_S.grad``), i.e. what the
loss itself costs. Goals use ``overhead``, in units of one fp32 logits tensor (tokens x vocab x 4).

The reference at 8192 x 128256 needs ~10 logits tensors of 4.2 GB; when that does not fit in the
memory available (``--max-gb``), it runs at fewer tokens and its memory and time are scaled
linearly in tokens (they are linear: every tensor involved is tokens x something); the table marks
those rows "scaled from N".

Timings are medians of ``--repeats`` runs after one warm-up, on a CPU shared with other processes:
expect noise of tens of percent; compare ratios within one run rather than across runs.

    python benchmarks/loss_memory.py                      # the full table (~minutes on 2 cores)
    python benchmarks/loss_memory.py --tokens 1024 --vocab 32000   # one size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GIB = 2**30


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

    step()  # warm-up: thread pools, allocator
    h_s.grad = w_s.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    step()
    extra = (_status_kib("VmHWM") - before) * 1024
    grads = (w_s.numel() + h_s.numel()) * 4
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"extra": extra, "overhead": extra - grads, "seconds": times[len(times) // 2], "loss": loss}


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
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": ROOT})
    if out.returncode != 0:
        raise RuntimeError(f"{path} {tokens}x{vocab} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if run_tokens != tokens:
        f = tokens / run_tokens
        grads_run = (vocab * args.hidden + run_tokens * args.hidden) * 4
        grads = (vocab * args.hidden + tokens * args.hidden) * 4
        result["overhead"] *= f
        result["extra"] = result["overhead"] + grads
        result["seconds"] *= f
        result["scaled_from"] = run_tokens
        del grads_run
    return result


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--hidden", type=int, default=256, help="hidden size of both models' last layer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loss-type", default="forward_kl")
    p.add_argument("--max-gb", type=float, default=16.0, help="memory a reference case may use")
    p.add_argument("--one", nargs=3, metavar=("PATH", "TOKENS", "VOCAB"), help=argparse.SUPPRESS)
    args = p.parse_args()
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
    goals = {}
    for r in rows:
        if (r["tokens"], r["vocab"]) == (1024, 32000):
            goals["chunked_le_one_logits_at_1024x32000"] = r["chunked_overhead_logits"] <= 1.0
        if (r["tokens"], r["vocab"]) == (8192, 128256):
            goals["chunked_le_eighth_of_reference_at_8192x128256"] = r["memory_ratio"] <= 1 / 8
    goals["chunked_no_slower"] = all(r["speedup"] >= 1.0 for r in rows)
    print(json.dumps({"benchmark": "loss_memory", "hidden": args.hidden, "loss_type": args.loss_type,
                      "rows": rows, "goals": goals}))  # fmt: skip


if __name__ == "__main__":
    main()
