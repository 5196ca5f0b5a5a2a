"""What does measuring FLOPs cost a training step, and does the measured count match the analytic one?

    python benchmarks/cost_meter.py [--steps 15] [--large-steps 5] [--only tiny|large]

For each teacher -> student pair, one DistillTrainer step (teacher forward, student forward + backward,
loss, optimizer step) is timed with the cost meter attached and without it, alternating in one process
so drift hits both equally. Reported:

  plain, metered : median step time without / with the meter (shapes already counted)
  overhead       : median over alternations of metered / plain - 1 (each pair back to back); the goal
                   is < 1%; on a shared CPU this is mostly noise, so
  bookkeeping    : the meter's own per-step work (two measure() blocks around no computation),
                   timed over many repetitions, as a share of the plain step: the noise-free number
  first step     : the one step per input shape that runs FlopCounterMode, relative to a plain step
  measured / analytic FLOPs per step, teacher and student (analytic: distill.planner.training_flops)

Prints a table and a one-line JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import DistillConfig  # noqa: E402
from distill.flops import model_size  # noqa: E402
from distill.planner import training_flops  # noqa: E402
from distill.trainer import DistillTrainer  # noqa: E402


def llama(layers, hidden, inter, vocab, heads, kv_heads, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
        max_position_embeddings=1024, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def setups(only):
    if only in (None, "tiny"):
        tiny = ROOT / "tiny_models"
        if (tiny / "teacher").is_dir() and (tiny / "student").is_dir():
            from distill.models import load_model

            pair = load_model(str(tiny / "teacher")), load_model(str(tiny / "student"))
        else:  # the shapes scripts/build_tiny_models.py gives them, random weights
            pair = llama(4, 128, 352, 1024, 4, 2), llama(2, 64, 176, 1000, 4, 2, tie=True, seed=1)
        yield "tiny (4x128 -> 2x64)", *pair, (16, 128), "steps"
    if only in (None, "large"):
        yield "large (8x512 -> 4x256, V=32000)", llama(8, 512, 1408, 32000, 8, 4), llama(4, 256, 704, 32000, 4, 2, seed=1), (4, 256), "large_steps"  # fmt: skip


def analytic(model):
    with tempfile.TemporaryDirectory() as d:
        model.config.save_pretrained(d)
        return model_size(d)


def bench(name, teacher, student, shape, steps):
    batch, seq = shape
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(teacher.config.vocab_size, student.config.vocab_size), (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    tokens = torch.tensor(int((ids[:, 1:] != -100).sum()))
    with tempfile.TemporaryDirectory() as out:
        args = DistillConfig(
            output_dir=out, teacher_model_name_or_path="unused", use_cpu=True, report_to="none",
            learning_rate=1e-4, disable_tqdm=True,
        )  # fmt: skip
        trainer = DistillTrainer(model=student, teacher=teacher, args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=10 * steps)
        opt = trainer.optimizer
        cost = trainer.cost
        trainer.callback_handler.remove_callback(cost)

        def step(metered):
            if metered:
                trainer.callback_handler.add_callback(cost)
            start = time.perf_counter()
            trainer.training_step(student, dict(inputs), num_items_in_batch=tokens)
            opt.step()
            opt.zero_grad()
            seconds = time.perf_counter() - start
            if metered:
                trainer.callback_handler.remove_callback(cost)
            return seconds

        step(False)  # warm-up: allocator, kernels, optimizer state
        plain0 = step(False)
        first = step(True)  # counts the shapes: FlopCounterMode runs
        per_step = dict(cost.meter.flops)
        times = {"plain": [plain0], "metered": []}
        for _ in range(steps):
            times["metered"].append(step(True))
            times["plain"].append(step(False))

        # The per-step work the meter adds once shapes are known, without the model's noise around it.
        trainer.callback_handler.add_callback(cost)
        reps = 2000
        start = time.perf_counter()
        for _ in range(reps):
            with cost.student_step(inputs), cost.teacher_forward(inputs):
                pass
        bookkeeping = (time.perf_counter() - start) / reps

    med = {k: statistics.median(v) for k, v in times.items()}
    want = training_flops(analytic(student), batch * seq, seq, analytic(teacher))
    return {
        "setup": name,
        "batch": f"{batch}x{seq}",
        "plain_step_s": med["plain"],
        "metered_step_s": med["metered"],
        "overhead": statistics.median(m / p - 1 for m, p in zip(times["metered"], times["plain"][1:])),
        "bookkeeping_us": bookkeeping * 1e6,
        "bookkeeping_share": bookkeeping / med["plain"],
        "first_step_ratio": first / med["plain"],
        "teacher_flops": per_step["teacher"],
        "student_flops": per_step["student"],
        "teacher_measured_over_analytic": per_step["teacher"] / want["teacher"],
        "student_measured_over_analytic": per_step["student"] / want["student"],
        "steps": steps,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="alternations of metered and plain steps")
    parser.add_argument("--large-steps", type=int, default=5, help="alternations for the large pair")
    parser.add_argument("--only", choices=["tiny", "large"])
    args = parser.parse_args()
    rows = [bench(name, t, s, shape, getattr(args, steps)) for name, t, s, shape, steps in setups(args.only)]
    print(
        f"\n{'setup':32} {'batch':>7} {'plain':>9} {'metered':>9} {'overhead':>9} {'bookkeeping':>16} "
        f"{'1st step':>9} {'teacher FLOPs':>14} {'meas/anal':>10} {'student FLOPs':>14} {'meas/anal':>10}"
    )
    for r in rows:
        print(
            f"{r['setup']:32} {r['batch']:>7} {r['plain_step_s']:>8.4f}s {r['metered_step_s']:>8.4f}s "
            f"{r['overhead']:>+9.2%} {r['bookkeeping_us']:>7.1f}us {r['bookkeeping_share']:>7.3%} "
            f"{r['first_step_ratio']:>8.2f}x {r['teacher_flops']:>14.4e} {r['teacher_measured_over_analytic']:>10.6f} "
            f"{r['student_flops']:>14.4e} {r['student_measured_over_analytic']:>10.6f}"
        )
    print(
        f"threads={torch.get_num_threads()} torch={torch.__version__}; goal: overhead < 1% of a step "
        "(timings on a shared CPU are noisy; the bookkeeping column is the meter's own cost)"
    )
    print(json.dumps({"benchmark": "cost_meter", "results": rows}))


if __name__ == "__main__":
    main()
