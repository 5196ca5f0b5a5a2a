"""Where the time of an on-policy distillation step goes: the student's sampling, the teacher's scoring
of the samples, and the student's training step.

    python benchmarks/on_policy.py [--steps 5] [--only tiny|large]

For each teacher -> student pair, with lmbda 1 (every batch on-policy), it times, alternating in one
process, medians over --steps:
  generation : the student samples a completion for each prompt (transformers' generate, KV cache)
  teacher    : the teacher's forward over prompt + sample (no grad): the scoring
  training   : DistillTrainer.training_step on that batch + the optimizer step, minus the teacher's
               forward it contains
and reports sampled tokens per second of generation and target tokens per second of the whole step.
vLLM generation (TRL's use_vllm) is not implemented in distill yet: the rows say so. Prints a table
and a one-line JSON.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_overhead import llama  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.data import Collator  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402
from distill.trainer import DistillTrainer  # noqa: E402


class Tokens:
    """What the trainer reads of a tokenizer when it samples: the pad and end ids."""

    def __init__(self, pad, eos):
        self.pad_token_id, self.eos_token_id = pad, eos


def setups(only):
    if only in (None, "tiny"):
        tok = load_tokenizer(str(ROOT / "tiny_models/student"))
        rows = [json.loads(x) for x in (ROOT / "tiny_models/data/domain_train.jsonl").read_text().splitlines()[:16]]
        batch = []
        for r in rows:
            prompt = tok(r["prompt"])["input_ids"]
            completion = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            batch.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
        teacher, student = load_model(str(ROOT / "tiny_models/teacher")), load_model(str(ROOT / "tiny_models/student"))
        yield "tiny (4x128 -> 2x64)", teacher, student, tok, batch, 32
    if only in (None, "large"):
        g = torch.Generator().manual_seed(0)
        batch = []
        for _ in range(4):
            ids = torch.randint(3, 32000, (128,), generator=g).tolist()
            batch.append({"input_ids": ids, "labels": [-100] * 64 + ids[64:]})
        # eos id 2 is never forced: random weights sample every one of the max_new_tokens
        yield (
            "large (8x512 -> 4x256, V=32000)",
            llama(8, 512, 32000, 0),
            llama(4, 256, 32000, 1),
            Tokens(0, 2),
            batch,
            64,
        )


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(name, teacher, student, tokenizer, rows, max_new_tokens, steps):
    data = Collator(tokenizer.pad_token_id)(rows)
    with tempfile.TemporaryDirectory() as out:
        args = DistillConfig(
            output_dir=out, teacher_model_name_or_path="unused", use_cpu=True, report_to="none", alpha=1.0,
            loss_type="reverse_kl", lmbda=1.0, max_new_tokens=max_new_tokens, learning_rate=1e-4, disable_tqdm=True,
            measure_cost=False,
        )  # fmt: skip
        trainer = DistillTrainer(model=student, teacher=teacher, args=args, processing_class=tokenizer)
        trainer.create_optimizer_and_scheduler(num_training_steps=10 * steps)
        times = {"generation": [], "teacher": [], "step": []}
        sampled = 0
        for i in range(steps + 1):  # the first round warms up allocator, kernels and optimizer state
            t_gen, batch = timed(lambda i=i: trainer._sample(data, seed=i))
            inputs = trainer._prepare_inputs({**batch, "on_policy": torch.tensor(True)})
            n = inputs["labels"][:, 1:].ne(-100).sum()

            def score(inputs=inputs):
                with torch.no_grad():
                    teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])

            def train(inputs=inputs, n=n):
                trainer.training_step(student, dict(inputs), num_items_in_batch=n)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()

            t_teacher, _ = timed(score)
            t_step, _ = timed(train)
            if i:
                times["generation"].append(t_gen)
                times["teacher"].append(t_teacher)
                times["step"].append(t_step)
                sampled += int(n)  # every target of an on-policy batch is a sampled token
    med = {k: statistics.median(v) for k, v in times.items()}
    training = max(med["step"] - med["teacher"], 0.0)
    total = med["generation"] + med["step"]
    return {
        "setup": name,
        "batch": f"{len(rows)} prompts x {max_new_tokens} new tokens max",
        "generation_s": med["generation"],
        "teacher_scoring_s": med["teacher"],
        "training_s": training,
        "step_s": total,
        "generation_share": med["generation"] / total,
        "sampled_tokens_per_s": sampled / steps / med["generation"],
        "step_target_tokens_per_s": sampled / steps / total,
        "engine": "transformers generate",
        "vllm": "not implemented",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", choices=["tiny", "large"])
    args = parser.parse_args()
    rows = [bench(*setup, args.steps) for setup in setups(args.only)]
    print(f"\n{'setup':34} {'generation':>11} {'teacher':>9} {'training':>9} {'step':>8} {'gen share':>9} "
          f"{'sampled tok/s':>13} {'step tok/s':>10}")  # fmt: skip
    for r in rows:
        print(
            f"{r['setup']:34} {r['generation_s']:>10.3f}s {r['teacher_scoring_s']:>8.3f}s {r['training_s']:>8.3f}s "
            f"{r['step_s']:>7.3f}s {r['generation_share']:>9.0%} {r['sampled_tokens_per_s']:>13,.0f} "
            f"{r['step_target_tokens_per_s']:>10,.0f}"
        )
    print(
        f"engine: transformers generate (vLLM: not implemented); threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(json.dumps({"benchmark": "on_policy", "results": rows}))


if __name__ == "__main__":
    main()
