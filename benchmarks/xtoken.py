"""Cross-tokenizer distillation on the tiny pair (tiny_models/teacher_xtok -> tiny_models/student):
which loss, and what the cross-tokenizer path costs.

    python benchmarks/xtoken.py [--steps 150] [--alpha 0.5] [--timing-steps 20] [--no-quality] [--no-cost]

1. Quality at equal steps: `distill train` (recipes/tiny_cpu_xtok.yaml, --steps optimizer steps) with
   label-only training (alpha 0: cross-entropy, no teacher in training), and --alpha (0.5) with each
   cross-tokenizer loss (xtoken_loss: uld, projected, hybrid). Held out (corpus_eval): the student's
   perplexity (exp of its mean cross-entropy per target token) and its cross-tokenizer agreement with
   the teacher (per aligned target position: the student's top-1 mapped through the vocabulary map is
   the teacher's top-1).
2. Cost: one `DistillTrainer.training_step` on the same 16 rows (max_length 128), same-tokenizer KD
   (tiny_models/teacher, the chunked loss and the reference path through the logits) against the
   cross-tokenizer path with each loss (teacher_xtok; chunked, and projected through the logits).
   Both tokenise each row as one document, so the student's side is identical; the teacher_xtok
   side is longer (its tokenizer needs ~1.3x the tokens for the same text) and its model is a little
   smaller (MLP 256 vs 352, vocabulary 640 vs 960). Time: median step after 2 warm-up steps, all
   cases in one process taking turns step by step. Memory: the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
   over the steps, each case in a fresh process with glibc's mmap threshold at 64 KiB so freed
   tensors leave the resident set (as benchmarks/loss_memory.py measures it).

Prints two tables and a one-line JSON. On a shared CPU expect tens of percent of timing noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
CASES = {  # name -> (teacher, chunked_loss, xtoken_loss)
    "same-tokenizer KD (chunked)": ("teacher", True, None),
    "same-tokenizer KD (reference)": ("teacher", False, None),
    "cross uld": ("teacher_xtok", True, "uld"),
    "cross projected": ("teacher_xtok", True, "projected"),
    "cross hybrid": ("teacher_xtok", True, "hybrid"),
    "cross projected (reference)": ("teacher_xtok", False, "projected"),
}
METHODS = ("uld", "projected", "hybrid")


def quality(steps: int, alpha: float) -> dict:
    from distill import train

    out = {}
    runs = {"label-only": ["--alpha", "0"], **{m: ["--xtoken_loss", m, "--alpha", str(alpha)] for m in METHODS}}
    for name, overrides in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            metrics = train.run(
                str(ROOT / "recipes/tiny_cpu_xtok.yaml"),
                [*overrides, "--max_steps", str(steps), "--output_dir", tmp, "--save_strategy", "no",
                 "--disable_tqdm", "true", "--logging_steps", str(steps), "--report_to", "none"],
            )  # fmt: skip
        ev, before = metrics["eval"], metrics["eval_before"]
        out[name] = {
            "perplexity": math.exp(ev["eval_ce_loss"]),
            "agreement": ev["eval_agreement"],
            "perplexity_before": math.exp(before["eval_before_ce_loss"]),
            "agreement_before": before["eval_before_agreement"],
        }
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build_case(name: str, tmp: str):
    """(one training step of the case, its batch), models loaded."""
    import torch

    from distill.config import DistillConfig
    from distill.data import Collator, tokenize_pair
    from distill.models import load_model, load_tokenizer
    from distill.teacher import ModelTeacher
    from distill.trainer import DistillTrainer
    from distill.xtoken import build_vocab_map

    torch.set_num_threads(1)
    teacher_name, chunked, method = CASES[name]
    student_tok = load_tokenizer(str(ROOT / "tiny_models/student"))
    teacher_tok = load_tokenizer(str(ROOT / f"tiny_models/{teacher_name}"))
    with open(ROOT / "tiny_models/data/corpus_train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(16)]
    pairs = [tokenize_pair(r, student_tok, teacher_tok, 128, 256) for r in rows]
    batch = Collator(student_tok.pad_token_id, teacher_pad_token_id=teacher_tok.pad_token_id)(pairs)
    if method is None:  # the same-tokenizer path reads only the student's side
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    student = load_model(str(ROOT / "tiny_models/student"))
    teacher = load_model(str(ROOT / f"tiny_models/{teacher_name}"))
    if method is not None:
        teacher = ModelTeacher(teacher, build_vocab_map(student_tok, teacher_tok), method, top_k=64)
    args = DistillConfig(
        output_dir=tmp, teacher_model_name_or_path="x", alpha=0.9, use_cpu=True, report_to="none",
        chunked_loss=chunked, learning_rate=1e-3, measure_cost=False,
    )  # fmt: skip
    trainer = DistillTrainer(model=student, teacher=teacher, args=args, processing_class=student_tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    student.train()

    def step():
        trainer.training_step(student, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return step, batch


def memory_case(name: str, steps: int) -> dict:
    """The case's peak resident set rise over ``steps`` steps, in this (fresh) process."""
    with tempfile.TemporaryDirectory() as tmp:
        step, batch = build_case(name, tmp)
        for _ in range(2):
            step()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        for _ in range(steps):
            step()
        extra = (_status_kib("VmHWM") - before) * 1024
    return {
        "peak_extra_mib": extra / 2**20,
        "teacher_tokens": int(batch.get("teacher_input_ids", batch["input_ids"]).numel()),
        "student_tokens": int(batch["input_ids"].numel()),
    }


def timing(steps: int) -> dict:
    """Median step time of every case, all in this process, one step of each in turn, so that the
    shared CPU's drift hits all alike."""
    with tempfile.TemporaryDirectory() as tmp:
        cases = {name: build_case(name, tmp)[0] for name in CASES}
        times = {name: [] for name in CASES}
        for i in range(steps + 2):
            for name, step in cases.items():
                start = time.perf_counter()
                step()
                if i >= 2:  # warm-up
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cost(steps: int) -> dict:
    out = {}
    for name in CASES:
        cmd = [sys.executable, __file__, "--case", name, "--timing-steps", "3"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: {done.stderr[-2000:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    for name, seconds in timing(steps).items():
        out[name]["seconds"] = seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of each quality run")
    parser.add_argument("--timing-steps", type=int, default=20, help="timed training steps of each cost case")
    parser.add_argument("--alpha", type=float, default=0.5, help="KD weight of the quality runs (the recipe's: 0.5)")
    parser.add_argument("--no-quality", action="store_true", help="only the cost table")
    parser.add_argument("--no-cost", action="store_true", help="only the quality table")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(memory_case(args.case, args.timing_steps)))
        return
    result = {"steps": args.steps, "alpha": args.alpha}
    if not args.no_quality:
        result["quality"] = q = quality(args.steps, args.alpha)
        print(f"\nHeld out after {args.steps} steps, alpha {args.alpha} (teacher_xtok -> student, corpus_eval):\n")
        print(f"| {'training':<12} | perplexity | cross-tokenizer agreement |")
        print(f"|{'-' * 14}|-----------:|--------------------------:|")
        first = next(iter(q.values()))
        print(f"| {'(start)':<12} | {first['perplexity_before']:>10.3f} | {first['agreement_before']:>25.4f} |")
        for name, r in q.items():
            print(f"| {name:<12} | {r['perplexity']:>10.3f} | {r['agreement']:>25.4f} |")
    if args.no_cost:
        print(json.dumps(result))
        return
    result["cost"] = c = cost(args.timing_steps)
    base = c["same-tokenizer KD (chunked)"]
    ref = c["same-tokenizer KD (reference)"]
    print("\nOne training step, 16 rows (CPU, 1 thread; ratios against same-tokenizer KD):\n")
    print(f"| {'path':<30} | teacher tokens | step s | x chunked | x reference | peak extra MiB |")
    print(f"|{'-' * 32}|---------------:|-------:|----------:|------------:|--------------:|")
    for name, r in c.items():
        r["time_vs_chunked"] = r["seconds"] / base["seconds"]
        r["time_vs_reference"] = r["seconds"] / ref["seconds"]
        print(
            f"| {name:<30} | {r['teacher_tokens']:>14} | {r['seconds']:>6.3f} | {r['time_vs_chunked']:>9.2f} | "
            f"{r['time_vs_reference']:>11.2f} | {r['peak_extra_mib']:>13.1f} |"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
