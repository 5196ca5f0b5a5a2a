"""How much does distillation cost on top of the two forward/backward passes it cannot avoid?

    python benchmarks/step_overhead.py [--steps 12] [--only tiny|large] [--reference] [--cuda]

For each setup it times, alternating in one process so drift hits all equally:
  teacher : teacher forward (no grad)
  student : student forward with labels (HF's own CE) + backward + optimizer step
  distill : one DistillTrainer.training_step (teacher forward, student forward, KD + CE loss,
            backward) + the same optimizer step
and reports ratio = median(distill) / (median(teacher) + median(student)). 1.0 is the physical
limit; the target is <= 1.15. With --cuda it runs on the GPU in bf16 mixed precision (the student's
baseline step under the same autocast) and adds the distillation step's MFU: its measured model FLOPs
(distill.flops) per second over the GPU's dense bf16 peak. Prints a table and a one-line JSON.
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

CHUNKED = "--reference" not in sys.argv
CUDA = "--cuda" in sys.argv
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import DistillConfig  # noqa: E402
from distill.cost import detect_accelerator  # noqa: E402
from distill.flops import FlopMeter  # noqa: E402
from distill.models import load_model  # noqa: E402
from distill.trainer import DistillTrainer  # noqa: E402


def llama(layers, hidden, vocab, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64 or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=1024, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def setups(only):
    if only in (None, "tiny"):
        yield (
            "tiny",
            load_model(str(ROOT / "tiny_models/teacher")),
            load_model(str(ROOT / "tiny_models/student")),
            (16, 128),
        )
    if only in (None, "large"):
        yield "large (8x512 -> 4x256, V=32000)", llama(8, 512, 32000, 0), llama(4, 256, 32000, 1), (4, 256)


def timed(fn):
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(name, teacher, student, shape, steps):
    batch, seq = shape
    vocab = student.config.vocab_size
    g = torch.Generator().manual_seed(0)
    device = "cuda" if CUDA else "cpu"
    ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA)
    with tempfile.TemporaryDirectory() as out:
        args = DistillConfig(
            output_dir=out, teacher_model_name_or_path="unused", use_cpu=not CUDA, bf16=CUDA, report_to="none",
            alpha=0.5, temperature=2.0, learning_rate=1e-4, disable_tqdm=True, chunked_loss=CHUNKED,
            measure_cost=False,
        )  # fmt: skip
        if CUDA:  # the teacher in bf16, as teacher_dtype: auto gives it under bf16: true
            teacher = teacher.to(device, torch.bfloat16)
        trainer = DistillTrainer(model=student, teacher=teacher, args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=10 * steps)
        opt = trainer.optimizer
        tokens = int((ids[:, 1:] != -100).sum())

        def teacher_fwd():
            with torch.no_grad():
                teacher(input_ids=ids, attention_mask=inputs["attention_mask"])

        def student_step():
            student.train()
            with autocast:
                loss = student(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()

        def distill_step():
            trainer.training_step(student, dict(inputs), num_items_in_batch=torch.tensor(tokens))
            opt.step()
            opt.zero_grad()

        for fn in (teacher_fwd, student_step, distill_step):  # warm-up: allocator, kernels, optimizer state
            fn()
        meter = FlopMeter()
        with meter.measure("distill", inputs):
            distill_step()
        times = {"teacher": [], "student": [], "distill": []}
        for _ in range(steps):
            times["teacher"].append(timed(teacher_fwd))
            times["student"].append(timed(student_step))
            times["distill"].append(timed(distill_step))
    med = {k: statistics.median(v) for k, v in times.items()}
    found = detect_accelerator()
    peak = found[1] if found else None
    return {
        "setup": name,
        "batch": f"{batch}x{seq}",
        "teacher_fwd_s": med["teacher"],
        "student_step_s": med["student"],
        "distill_step_s": med["distill"],
        "ratio": med["distill"] / (med["teacher"] + med["student"]),
        "distill_step_flops": meter.total,
        "mfu": meter.total / med["distill"] / (peak * 1e12) if peak else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", choices=["tiny", "large"])
    parser.add_argument("--reference", action="store_true", help="time the reference (full-logits) loss path")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU in bf16 mixed precision, with MFU")
    args = parser.parse_args()
    rows = [bench(name, t, s, shape, args.steps) for name, t, s, shape in setups(args.only)]
    print(
        f"\n{'setup':34} {'batch':>8} {'teacher fwd':>12} {'student step':>13} {'distill step':>13} {'ratio':>7} {'MFU':>7}"
    )
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(
            f"{r['setup']:34} {r['batch']:>8} {r['teacher_fwd_s']:>11.4f}s {r['student_step_s']:>12.4f}s "
            f"{r['distill_step_s']:>12.4f}s {r['ratio']:>7.3f} {mfu:>7}"
        )
    path = ("reference" if args.reference else "chunked (default)") + (", cuda bf16" if CUDA else ", cpu fp32")
    print(
        f"loss path={path} threads={torch.get_num_threads()} torch={torch.__version__}  target ratio <= 1.15, limit 1.0"
    )
    print(json.dumps({"benchmark": "step_overhead", "loss_path": path, "results": rows}))


if __name__ == "__main__":
    main()
