"""Is a student cut out of the teacher (`distill prune`) a better start than random weights, and what
does the importance pass cost?

    python benchmarks/prune_quality.py [--steps 100] [--skip-training] [--reps 5]

Quality, on the tiny models: `recipes/tiny_cpu_prune.yaml` prunes the tiny teacher (4 x 128) to
2 layers x 64 (2/1 heads, MLP 176). A random-init student of exactly that config (same seed as
every transformers init) is the baseline. Each of the two is trained with `recipes/tiny_cpu.yaml`'s
settings for the same ``--steps`` on the same batches (so the same tokens): with KD (alpha 0.9)
and with labels only (alpha 0). Each student (and both untrained) is scored on
tiny_models/data/corpus_eval.jsonl (held out from both the calibration and the training data):

  perplexity   exp(mean cross-entropy) over the target tokens
  agreement    share of target positions where the student's most likely token is the teacher's
  gap closed   (ppl_random - ppl_pruned) / (ppl_random - ppl_teacher), random and pruned trained
               alike: 0 = pruning bought nothing, 1 = the pruned student is as good as the teacher

Speed and memory of `distill.importance.calibrate` (hooks + running sums, one pass) against a plain
inference forward over the same calibration batches (full logits, as any forward returns them), and
against the same forward with the last position's logits only (what calibrate runs: the hooks' cost
alone). On the tiny teacher (10 batches of 16 x 128 tokens) and on a random-weights Llama 8 x 256
(GQA 8/2, MLP 704, vocab 960; 4 batches of 8 x 128).
Times: median of ``--reps`` alternated passes. Memory: the peak resident set size of a fresh process
during one pass (sampled every 0.5 ms from /proc/self/statm), minus its resident size just before the
pass (model and batches loaded, one batch run to warm the allocator): what the pass itself adds,
activations and the scores; allocations that come and go between two samples are missed. Goal: time <= 1.3x the plain
forward, memory within it (no per-token store over the set).

Prints a table and a one-line JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill import importance as imp  # noqa: E402

TEACHER = ROOT / "tiny_models" / "teacher"


def calibration_batches(n_batches=10, batch_size=16, length=128):
    from distill.data import Collator, load_rows, tokenize
    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(str(TEACHER))
    rows = load_rows(str(ROOT / "tiny_models/data/corpus_train.jsonl")).select(range(600))
    data = tokenize(rows, tokenizer, length)
    collate = Collator(tokenizer.pad_token_id)
    return [collate([data[j] for j in range(i * batch_size, (i + 1) * batch_size)]) for i in range(n_batches)]


def model_for(which: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if which == "tiny":
        return AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=960, hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def one_pass(model, batches, kind: str):
    if kind == "calibrate":
        imp.calibrate(model, batches, progress=False)
        return
    for b in batches:
        extra = {"logits_to_keep": 1} if kind == "forward_last" else {}
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False, **extra)


def batches_for(which: str):
    # The larger model gets fewer tokens (4 x 8 x 128), to keep the script within minutes on a CPU.
    return calibration_batches() if which == "tiny" else calibration_batches(4, 8)


def timings(which: str, reps: int) -> dict:
    model, batches = model_for(which), batches_for(which)
    one_pass(model, batches[:1], "calibrate")  # warm-up
    kinds = ("forward", "forward_last", "calibrate")
    times = {k: [] for k in kinds}
    for _ in range(reps):
        for kind in kinds:
            start = time.perf_counter()
            one_pass(model, batches, kind)
            times[kind].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def memory_child(which: str, kind: str) -> None:
    model, batches = model_for(which), batches_for(which)
    one_pass(model, batches[:1], "forward_last")  # allocator and kernels warmed, for both kinds alike
    before, peak, running = rss_bytes(), [0], [True]

    def sample():  # ru_maxrss cannot be reset after loading; poll the resident size instead
        while running[0]:
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    one_pass(model, batches, kind)
    running[0] = False
    sampler.join()
    print(json.dumps({"extra_bytes": max(peak[0] - before, 0)}))


def memory(which: str, kind: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", which, kind], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"]


# ---------------------------------------------------------------------------------------------------
# Quality


def train(student: str, out: Path, alpha: float, steps: int) -> None:
    from distill import train as job

    job.run(
        str(ROOT / "recipes/tiny_cpu.yaml"),
        ["--model_name_or_path", student, "--output_dir", str(out), "--alpha", str(alpha), "--max_steps", str(steps),
         "--warmup_steps", str(max(steps // 10, 1)), "--save_strategy", "no", "--logging_steps", str(steps),
         "--disable_tqdm", "true"],
    )  # fmt: skip


def held_out(teacher, student_path, batches) -> dict:
    from distill.evaluate import score
    from distill.models import load_model

    sums = score(teacher, load_model(str(student_path)).eval(), batches)
    n = sums["targets"]
    return {
        "perplexity": math.exp(sums["nll_student"] / n),
        "agreement": sums["matches"] / n,
        "teacher_perplexity": math.exp(sums["nll_teacher"] / n),
    }


def quality(steps: int, work: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill import prune
    from distill.data import Collator, load_rows, tokenize
    from distill.models import load_model, load_tokenizer

    pruned = work / "pruned"
    prune.run(str(ROOT / "recipes/tiny_cpu_prune.yaml"), ["--output_dir", str(pruned)])
    random = work / "random"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(pruned).config).save_pretrained(random)
    AutoTokenizer.from_pretrained(TEACHER).save_pretrained(random)

    tokenizer = load_tokenizer(str(TEACHER))
    data = tokenize(load_rows(str(ROOT / "tiny_models/data/corpus_eval.jsonl")), tokenizer, 128)
    collate = Collator(tokenizer.pad_token_id)
    batches = [collate([data[j] for j in range(i, min(i + 16, len(data)))]) for i in range(0, len(data), 16)]
    teacher = load_model(str(TEACHER)).eval()

    rows = {"untrained": {s: held_out(teacher, work / s, batches) for s in ("random", "pruned")}}
    for mode, alpha in (("KD", 0.9), ("labels only", 0.0)):
        rows[mode] = {}
        for start in ("random", "pruned"):
            train(str(work / start), work / f"{start}-{alpha}", alpha, steps)
            rows[mode][start] = held_out(teacher, work / f"{start}-{alpha}", batches)
    ppl_teacher = rows["untrained"]["random"]["teacher_perplexity"]
    for mode in rows:
        r, p = rows[mode]["random"]["perplexity"], rows[mode]["pruned"]["perplexity"]
        rows[mode]["gap_closed"] = (r - p) / (r - ppl_teacher)
    return {"teacher_perplexity": ppl_teacher, "steps": steps, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    torch.set_num_threads(1)  # the timings of a shared CPU are steadier on one thread
    result = {"benchmark": "prune_quality"}
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as work:
            result["quality"] = quality(args.steps, Path(work))
    result["cost"] = {}
    for which in ("tiny", "llama 8x256"):
        t = timings(which, args.reps)
        m = {k: memory(which, k) for k in ("forward", "calibrate")}
        result["cost"][which] = {
            "seconds": t,
            "time_vs_forward": t["calibrate"] / t["forward"],
            "time_vs_forward_last": t["calibrate"] / t["forward_last"],
            "extra_bytes": m,
            "memory_vs_forward": m["calibrate"] / max(m["forward"], 1),
        }

    if "quality" in result:
        q = result["quality"]
        print(
            f"\nquality on corpus_eval.jsonl, {q['steps']} steps each (teacher perplexity {q['teacher_perplexity']:.3f})"
        )
        print(f"{'training':<14}{'start':<9}{'perplexity':>12}{'agreement':>11}{'gap closed':>12}")
        for mode, row in q["rows"].items():
            for start in ("random", "pruned"):
                gap = f"{row['gap_closed']:.3f}" if start == "pruned" else ""
                print(f"{mode:<14}{start:<9}{row[start]['perplexity']:>12.3f}{row[start]['agreement']:>11.3f}{gap:>12}")
    print("\nimportance pass (calibrate) vs a plain forward over the same calibration tokens")
    print(f"{'model':<13}{'forward s':>10}{'last-logit s':>13}{'calibrate s':>12}{'x forward':>10}"
          f"{'forward MiB':>12}{'calibrate MiB':>14}")  # fmt: skip
    for which, c in result["cost"].items():
        s, m = c["seconds"], c["extra_bytes"]
        print(
            f"{which:<13}{s['forward']:>10.3f}{s['forward_last']:>13.3f}{s['calibrate']:>12.3f}"
            f"{c['time_vs_forward']:>10.2f}{m['forward'] / 2**20:>12.1f}{m['calibrate'] / 2**20:>14.1f}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
