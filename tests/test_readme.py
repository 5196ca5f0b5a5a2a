"""The README is executable: every shell command in its ```bash blocks runs, in order, in a copy of
the repository, on the tiny models, and the figures it quotes are the ones those commands print.

Commands that cannot run here are listed in NOT_RUN with the reason. The figures are read back from
what the commands printed or wrote, and compared with the README's at the tolerances stated below;
timings (seconds, FLOP/s, tokens/s) and thread-dependent speeds are not compared: they are this
machine's, at that moment.
"""

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"

# command prefix -> why the test does not run it
NOT_RUN = {
    "pip install": "installs: the test runs in the environment those commands made",
    "python -m pytest": "the test suite itself, this test included",
    "distill cost --student Qwen/": "reads the models' configs from the hub",
    "accelerate launch --config_file recipes/accelerate/single_gpu.yaml": "needs a GPU and a hub model",
    "accelerate launch --config_file recipes/accelerate/multi_gpu.yaml": "needs 8 GPUs and hub models",
    "accelerate launch --config_file recipes/accelerate/fsdp.yaml": "needs 8 or 16 GPUs and hub models",
    "torchrun": "several processes (tests/test_launch.py runs the tiny recipe under torchrun DDP)",
    "CUDA_VISIBLE_DEVICES=": "GPUs and a hub model",
    "vllm serve": "vLLM on GPUs and a hub model",
    "VLLM_SERVER_DEV_MODE=1": "vLLM on GPUs and a hub model (tests/test_vllm_sampling.py runs its CPU build)",
    "python scripts/serve_vllm_cpu.py": "a server that runs until stopped; tests/test_teacher_server.py starts one",
    "distill train recipes/tiny_cpu.yaml --teacher_server": "needs that server: tests/test_teacher_server.py "
    "trains from it",
}


def readme_commands(text: str) -> list[str]:
    """Every shell command of the ```bash blocks, in order: continued lines joined, comments
    dropped, and `a && b` split into its parts."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                part = words[: words.index("&&")] if "&&" in words else words
                commands.append(shlex.join(part))
                words = words[len(part) + 1 :]
    return commands


def not_run(command: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)


def copy_of_repository(to: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked, and new ones not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is not copied
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, to / name)
    return to


def environment(copy: Path) -> dict:
    """Commands run the copy's package (the installed one is this checkout, editable) with this
    interpreter's tools first on the PATH, and never reach for the hub."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """Every README command run in order in a copy of the repository: {command: its output}."""
    copy = copy_of_repository(tmp_path_factory.mktemp("repo"))
    env = environment(copy)
    where = subprocess.run(
        [sys.executable, "-c", "import distill; print(distill.__file__)"], cwd=copy, env=env, capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(copy)), f"the commands would not run the copy's distill but {where}"

    outputs, seconds = {}, {}
    for command in readme_commands(README.read_text(encoding="utf-8")):
        if not_run(command) or command in outputs:  # a command shown twice (in a walkthrough) runs once
            continue
        start = time.perf_counter()
        proc = subprocess.run(shlex.split(command), cwd=copy, env=env, capture_output=True, text=True, timeout=600)
        seconds[command] = time.perf_counter() - start
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README command failed (exit {proc.returncode}): {command}\n{output[-4000:]}"
        outputs[command] = output
    print("\nREADME commands, seconds:\n" + "\n".join(f"{s:7.1f}  {c}" for c, s in seconds.items()))
    return {"dir": copy, "outputs": outputs}


def test_ci_runs_the_readmes_test_command_exactly():
    """.ci/run runs the README's command 2, character for character, as its first command after the
    fresh environment (then the same tests at the oldest releases), and both install torch from
    PyTorch's CPU index (on PyPI, Linux x86_64 torch is the multi-GB CUDA build)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    two = [line for line in blocks[0].splitlines() if line and not line.startswith("#")]
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.startswith("pip ")]
    assert len(two) == 2 and ci == [two[1]], (two, ci)
    for command in two:
        assert command.startswith('pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu && ')


def test_every_readme_command_runs_or_is_listed_with_why_it_cannot(readme):
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert list(dict.fromkeys(c for c in commands if not not_run(c))) == list(readme["outputs"])
    unused = [prefix for prefix in NOT_RUN if not any(c.startswith(prefix) for c in commands)]
    assert unused == [], "NOT_RUN lists commands the README no longer has"


# --- The figures -----------------------------------------------------------------------------------
#
# A quoted figure agrees with its source when it is the source's value at the precision the README
# writes it with (934.7 for 934.65). Counts, FLOPs, parameters and everything the teacher alone
# decides are deterministic, and are held to that. Figures of a trained student (losses, agreement,
# KL, perplexity, greedy answers) are bitwise the same from run to run on this machine, with 1 or 2
# threads (measured); another CPU may round differently, so they may also be TRAINED off, relatively.
TRAINED = 0.02
NUMBER = r"\$?[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?[KM]?"


def prose() -> str:
    """The README with its whitespace collapsed, so that a quoted passage may span lines."""
    return " ".join(README.read_text(encoding="utf-8").split())


def quoted(passage: str) -> list[str]:
    """The numbers the README writes where it says ``passage`` ({} standing for each number)."""
    pattern = re.escape(" ".join(passage.split())).replace(r"\{\}", f"({NUMBER})")
    found = re.search(pattern, prose())
    assert found, f"the README no longer says: {passage}"
    return list(found.groups())


def agrees(text: str, value: float, rel: float = 0.0) -> bool:
    """Whether the number ``text`` (3,637 / 8.059e11 / $4.9e-6 / 853K / 0.20) is ``value`` at the
    precision it is written with, or within ``rel`` of it."""
    plain = text.replace(",", "").lstrip("$")
    scale = {"K": 1e3, "M": 1e6}.get(plain[-1], 1.0)
    mantissa, _, exponent = plain.rstrip("KM").partition("e")
    decimals = len(mantissa.partition(".")[2])
    last_digit = 10.0 ** (int(exponent or 0) - decimals) * scale
    return abs(float(plain.rstrip("KM")) * scale - value) <= max(last_digit / 2 * (1 + 1e-9), rel * abs(value))


def check(passage: str, *values: float, rel: float = 0.0) -> None:
    texts = quoted(passage)
    assert len(texts) == len(values), passage
    wrong = [(t, v) for t, v in zip(texts, values) if not agrees(t, v, rel)]
    assert not wrong, f"README: {passage}\n  says {texts}\n  the commands give {list(values)}"


def output(readme, command: str) -> str:
    return readme["outputs"][command]


def read_json(readme, path: str) -> dict:
    return json.loads((readme["dir"] / path).read_text(encoding="utf-8"))


def printed(text: str, pattern: str) -> list[float]:
    """The numbers ``pattern``'s groups capture in a command's output (thousands separators dropped)."""
    found = re.search(pattern, text)
    assert found, f"not in the output: {pattern}"
    return [float(g.replace(",", "")) for g in found.groups()]


def test_what_the_first_command_prints_is_what_the_readme_shows(readme):
    """The README's copy of the end of `distill train recipes/tiny_cpu.yaml`, line by line: the same
    words, the same FLOPs and tokens, the losses within TRAINED; the seconds and FLOP/s are not
    compared (timings)."""
    shown = re.search(r"^```\n(distill: cost \(measured\)\n.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    out = output(readme, "distill train recipes/tiny_cpu.yaml")
    start = out.index("distill: cost (measured)")
    end = out.index("student saved to runs/tiny_cpu", start)
    timing = re.compile(rf"{NUMBER}(?= s on )|{NUMBER}(?= FLOP/s per device)")
    lines = [[timing.sub("T", line).split() for line in text.splitlines() if line.strip()]
             for text in (shown[1], out[start:end] + "student saved to runs/tiny_cpu")]  # fmt: skip
    assert len(lines[0]) == len(lines[1])
    for words, actual in zip(*lines, strict=True):
        assert [re.sub(NUMBER, "N", w) for w in words] == [re.sub(NUMBER, "N", w) for w in actual], (words, actual)
        for w, a in zip(words, actual, strict=True):
            if re.fullmatch(NUMBER, w):
                exact = "e" in w or "," in w or "." not in w  # FLOPs, tokens, steps
                assert agrees(w, float(a.replace(",", "")), 0.0 if exact else TRAINED), (words, actual)


def test_the_first_commands_first_log_line_is_the_readmes(readme):
    """The README quotes the first logged line of the first command: the values printed as numbers
    (not strings), the same as trainer_state.json's first training log."""
    out = output(readme, "distill train recipes/tiny_cpu.yaml")
    line = ast.literal_eval(next(s for s in out.splitlines() if s.startswith("{'loss': ")))
    assert all(isinstance(v, int | float) for v in line.values()), line
    history = read_json(readme, "runs/tiny_cpu/trainer_state.json")["log_history"]
    first = next(entry for entry in history if "loss" in entry)
    assert line["loss"] == pytest.approx(first["loss"], rel=1e-3)
    check(
        "command's first, at step {}: `{'loss': {}, 'grad_norm': {}, 'learning_rate': {}, 'kd_loss': {}, "
        "'ce_loss': {}, 'flops_teacher': {}, ...}`",
        first["step"], line["loss"], line["grad_norm"], line["learning_rate"], line["kd_loss"], line["ce_loss"],
        line["flops_teacher"], rel=TRAINED,
    )  # fmt: skip


def test_the_cost_section_figures(readme):
    bill = read_json(readme, "runs/tiny_cpu/cost_report.json")
    check(
        "for comparison: {}e11 for the first command's run against {} measured",
        bill["trainer_total_flos"] / 1e11,
        bill["flops"]["total"],
    )
    gpt3 = output(readme, "distill cost --student 174.6e9 --tokens 300e9")
    days = printed(gpt3, r"student .*per token\s+\S+\s+(\d+)")
    servers = printed(gpt3, r"(\d+) for 3 days, (\d+) for 5 days, (\d+) for 10 days")
    check("# GPT-3: {} PFlop/s-day; {} / {} / {} servers of 5 PFlop/s for 3 / 5 / 10 days", *days, *servers)
    plan = output(
        readme, "distill cost --student tiny_models/student --teacher tiny_models/teacher --tokens 409600 --seq_len 128"
    )
    (planned,) = printed(plan, r"\n  total\s+(\S+)")
    measured = bill["flops"]["total"]
    check("the plan, {} FLOPs, is {}% above the {} measured", planned, 100 * (planned / measured - 1), measured)


def test_the_teacher_cache_figures(readme):
    figures = []
    for command in (
        "distill cache-teacher recipes/tiny_cpu.yaml --teacher_cache runs/teacher_cache --teacher_top_k 8",
        "distill cache-teacher recipes/tiny_cpu.yaml --teacher_cache runs/teacher_cache_t2 --teacher_top_k 8 --temperature 2",
    ):
        out = output(readme, command)
        figures.append(
            {
                "bytes": printed(out, r"(\d+) bytes per target token")[0],
                "tail": printed(out, r"train .* mean teacher mass outside the top k ([\d.]+)%")[0],
                "kd": printed(out, r"KD \S+ vs \S+ \(([\d.]+)%\)")[0],
            }
        )
    t1, t2 = figures
    check(
        "k = 8 costs {} bytes per target token, leaves {}% of the teacher's mass in the tail and the KD loss "
        "{}% off the full-vocabulary one; at T = 2 the teacher's distribution is flatter, and the same k "
        "leaves {}% of its mass in the tail and the KD loss {}% off",
        t1["bytes"], t1["tail"], t1["kd"], t2["tail"], t2["kd"],
    )  # fmt: skip


def test_the_cache_hint_is_the_readmes_training_command(readme):
    out = output(
        readme, "distill cache-teacher recipes/tiny_cpu.yaml --teacher_cache runs/teacher_cache --teacher_top_k 8"
    )
    hint = re.search(r"train on it with: (.*)", out)[1].strip()
    assert hint in readme["outputs"], hint


def test_the_lora_figures(readme):
    out = output(readme, "distill train recipes/tiny_cpu_lora.yaml")
    trainable, total, share = printed(out, r"trainable parameters: ([\d,]+) of ([\d,]+) \(([\d.]+)%\)")
    check("(`trainable parameters: {} of {} ({}%)` for the tiny recipe", trainable, total, share)
    assert read_json(readme, "runs/tiny_cpu_finetune/cost_report.json")["flops"]["teacher"] == 0


def test_the_walkthrough_table_and_its_reading(readme):
    distilled = read_json(readme, "runs/tiny_cpu/eval/eval_report.json")
    adapted = read_json(readme, "runs/tiny_cpu_finetune/eval/eval_report.json")
    teacher, student, lora = distilled["teacher"], distilled["student"], adapted["student"]
    assert adapted["teacher"] == {**teacher, "tokens_per_second": adapted["teacher"]["tokens_per_second"]}
    check("50 rows, {} answer tokens", distilled["data"]["target_tokens"])
    assert distilled["data"]["rows"] == 50
    check(
        "| parameters | {} | {} | {} (adapter merged) |",
        teacher["parameters"],
        student["parameters"],
        lora["parameters"],
    )
    check(
        "| perplexity | {} | {} | **{}** |",
        teacher["perplexity"],
        student["perplexity"],
        lora["perplexity"],
        rel=TRAINED,
    )
    check(
        "| agreement with the teacher | {} | {} | {} |",
        1,
        student["top1_agreement"],
        lora["top1_agreement"],
        rel=TRAINED,
    )
    check(
        "| KL(teacher ‖ student), nats/token | {} | {} | {} |",
        0, student["kl_teacher_student"], lora["kl_teacher_student"], rel=TRAINED,
    )  # fmt: skip
    check(
        "| FLOPs per generated token (context 512) | {} | {} ({}x) | {} |",
        teacher["flops_per_token"], student["flops_per_token"],
        student["flops_per_token"] / teacher["flops_per_token"], lora["flops_per_token"],
    )  # fmt: skip
    check(
        "| $ per 1M tokens (H100, 40% MFU, $2.5/h) | {} | {} | {} |",
        teacher["usd_per_million_tokens"], student["usd_per_million_tokens"], lora["usd_per_million_tokens"],
    )  # fmt: skip
    # The forward tokens/s row is a timing: not compared.

    finetune = read_json(readme, "runs/tiny_cpu_finetune/metrics.json")
    domain_rows = len((readme["dir"] / "tiny_models/data/domain_train.jsonl").read_text().splitlines())
    check(
        "(perplexity {} and {}; their greedy answers ramble)", teacher["perplexity"], student["perplexity"], rel=TRAINED
    )
    check(
        "agrees with the teacher on {}% of these tokens ({}% on held-out text",
        100 * student["top1_agreement"], 100 * distilled["training"]["final"]["eval_agreement"], rel=TRAINED,
    )  # fmt: skip
    check("LoRA fine-tuning on {} domain rows ({} steps", domain_rows, finetune["global_step"])
    check("perplexity from {} to {}, far below", student["perplexity"], lora["perplexity"], rel=TRAINED)
    check("*falls* ({} -> {})", student["top1_agreement"], lora["top1_agreement"], rel=TRAINED)
    answers = {g["prompt"]: g for g in adapted["generations"]}["Q: Which city is the capital of Zorvia?\nA:"]
    passage = f"-> teacher `{answers['teacher']}`, student `{answers['student']}`:"
    assert " ".join(passage.split()) in prose(), f"the README's greedy answers are not {passage}"

    cost = distilled["training"]["cost"]
    bill = read_json(readme, "runs/tiny_cpu/cost_report.json")["flops"]
    saving = teacher["flops_per_token"] - student["flops_per_token"]
    check(
        "measured cost: {} FLOPs (teacher forwards {} + student steps {}) = {} PFlop/s-days, repaid after the "
        "student serves about {} tokens in the teacher's place (training FLOPs / the per-token saving of {} FLOPs)",
        cost["flops"], bill["teacher"], bill["student"], cost["pflops_days"], cost["breakeven_tokens"], saving,
    )  # fmt: skip
    check(
        "The fine-tune run in step 4 shows held-out loss {} -> {}.",
        finetune["eval_before"]["eval_before_loss"], finetune["eval"]["eval_loss"], rel=TRAINED,
    )  # fmt: skip


def test_the_sequence_level_table(readme):
    from distill.config import DataArguments
    from distill.data import build_datasets
    from distill.models import load_tokenizer

    report = read_json(readme, "runs/tiny_seqkd/student/eval/eval_report.json")
    untrained, logit = report["compared"]
    seqkd, teacher = report["student"], report["teacher"]
    assert (untrained["path"], logit["path"]) == ("tiny_models/student", "runs/tiny_cpu")
    rows = {name: len((readme["dir"] / f"tiny_models/data/{name}.jsonl").read_text().splitlines())
            for name in ("corpus_train", "corpus_eval")}  # fmt: skip
    check(
        "(held-out text, `corpus_eval.jsonl`, {} texts, context {})", rows["corpus_eval"], report["data"]["max_length"]
    )

    # The target tokens the sequence-level student trained on: the teacher's completions, as
    # distill's data pipeline makes them (recipes/tiny_cpu_seqkd.yaml: max_length 64).
    generated = readme["dir"] / "runs/tiny_seqkd/generated.jsonl"
    data, _ = build_datasets(
        DataArguments(dataset=str(generated), max_length=64, eval_fraction=0.0),
        load_tokenizer(str(ROOT / "tiny_models/student")),
    )
    targets = sum(sum(1 for label in row["labels"][1:] if label != -100) for row in data)
    steps = {
        run: read_json(readme, f"{run}/metrics.json")["global_step"]
        for run in ("runs/tiny_seqkd/student", "runs/tiny_cpu")
    }

    def row(s):
        return s["perplexity"], s["top1_agreement"], s["kl_teacher_student"]

    check("| untrained | {} | {} | {} |", *row(untrained), rel=TRAINED)
    check(
        "| sequence-level KD: {} teacher continuations ({} target tokens), {} steps | {} | {} | {} |",
        len(data), targets, steps["runs/tiny_seqkd/student"], *row(seqkd), rel=TRAINED,
    )  # fmt: skip
    check(
        "| logit KD, `recipes/tiny_cpu.yaml`: the {}-text corpus, {} steps | {} | {} | {} |",
        rows["corpus_train"], steps["runs/tiny_cpu"], *row(logit), rel=TRAINED,
    )  # fmt: skip
    check("(The teacher: perplexity {}.)", teacher["perplexity"])


def test_the_on_policy_table(readme):
    """The on-policy and off-policy students the README's two commands train, scored as the README
    says (teacher-scored samples of the 50 held-out prompts); FLOPs from their cost reports, exactly;
    the wall seconds are timings and are not compared."""
    from distill.config import DataArguments
    from distill.data import Collator, build_datasets
    from distill.models import load_model, load_tokenizer
    from distill.on_policy import prompts_of, sample_quality

    tokenizer = load_tokenizer(str(ROOT / "tiny_models/student"))
    _, held = build_datasets(
        DataArguments(dataset=str(ROOT / "tiny_models/data/domain_train.jsonl"),
                      eval_dataset=str(ROOT / "tiny_models/data/domain_eval.jsonl"), max_length=64),
        tokenizer,
    )  # fmt: skip
    prompts = prompts_of(Collator(tokenizer.pad_token_id)([held[i] for i in range(len(held))]))
    assert len(prompts) == int(quoted("answers to the {} held-out questions")[0])
    teacher = load_model(str(ROOT / "tiny_models/teacher"))
    rows = {}
    for name, run in (("off", "runs/tiny_cpu_off_policy"), ("on", "runs/tiny_cpu_on_policy")):
        student = load_model(str(readme["dir"] / run))
        q = sample_quality(student, teacher, prompts, pad_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id],
                           max_new_tokens=16, seed=123)  # fmt: skip
        rows[name] = q, read_json(readme, f"{run}/cost_report.json")["flops"]
    (off, off_flops), (on, on_flops) = rows["off"], rows["on"]
    check("| off-policy (`lmbda: 0`) | {} | {} | {} FLOPs |", off["reverse_kl"], off["teacher_nll"],
          off_flops["total"], rel=TRAINED)  # fmt: skip
    check("| on-policy (`lmbda: 1`) | **{}** | **{}** | {} FLOPs (sampling {}) |", on["reverse_kl"],
          on["teacher_nll"], on_flops["total"], on_flops["student_generation"], rel=TRAINED)  # fmt: skip
    check("for {}x the FLOPs", on_flops["total"] / off_flops["total"])


def test_the_several_teachers_figures(readme):
    """The two-teacher run's bill (exact: FLOPs are deterministic) and held-out numbers (trained)."""
    run = "runs/tiny_cpu_two_teachers"
    report, metrics = read_json(readme, f"{run}/cost_report.json"), read_json(readme, f"{run}/metrics.json")
    first, second = report["teachers"]
    flops, days, per_token = report["flops"], report["pflops_days"], report["flops_per_token"]
    check("teacher {} FLOPs {} PFlop/s-day {} FLOPs/token student {} FLOPs {} PFlop/s-day {} FLOPs/token total {} "
          "FLOPs {} PFlop/s-day {} FLOPs/token tiny_models/teacher (weight {}): {} FLOPs, measured "
          "tiny_models/teacher_xtok (weight {}): {} FLOPs, measured",
          *(x[k] for k in ("teacher", "student", "total") for x in (flops, days, per_token)),
          first["weight"], first["flops"], second["weight"], second["flops"])  # fmt: skip
    assert flops["teacher"] == first["flops"] + second["flops"]
    before, after = metrics["eval_before"], metrics["eval"]
    check("agreement with teacher (held out) before {} after {} (the teachers', weighted)",
          before["eval_before_agreement"], after["eval_agreement"], rel=TRAINED)  # fmt: skip
    check("held-out KL to teacher before {} after {} (weighted)", before["eval_before_kd_loss"], after["eval_kd_loss"],
          rel=TRAINED)  # fmt: skip
    for i, name in enumerate(("tiny_models/teacher", "tiny_models/teacher_xtok")):
        check(f"teacher {i} {name} (weight {{}}): agreement before {{}} after {{}}, KL before {{}} after {{}}",
              0.5, before[f"eval_before_agreement_teacher_{i}"], after[f"eval_agreement_teacher_{i}"],
              before[f"eval_before_kd_loss_teacher_{i}"], after[f"eval_kd_loss_teacher_{i}"], rel=TRAINED)  # fmt: skip


def test_the_cross_tokenizer_cache_and_eval_figures(readme):
    """The run trained from the teacher-space cache (its numbers, trained; its bill and the cache's size,
    exact), and `distill eval` of the cross-tokenizer student: its agreement is the run's eval_agreement."""
    run = "runs/tiny_cpu_xtok_cached"
    metrics = read_json(readme, f"{run}/metrics.json")
    kd = [h["kd_loss"] for h in read_json(readme, f"{run}/trainer_state.json")["log_history"] if "kd_loss" in h]
    check("ends (final kd_loss {}, held-out agreement {}, KL {} in both)", kd[-1], metrics["eval"]["eval_agreement"],
          metrics["eval"]["eval_kd_loss"], rel=TRAINED)  # fmt: skip
    check("the cache holds {} bytes per teacher position (k {})",
          read_json(readme, "runs/xtok_cache/manifest.json")["bytes_per_token"], 64)  # fmt: skip
    check("billed the cache build's {} teacher FLOPs", read_json(readme, f"{run}/cost_report.json")["flops"]["teacher"])
    report = read_json(readme, "runs/tiny_cpu_xtok/eval/eval_report.json")
    trained = read_json(readme, "runs/tiny_cpu_xtok/metrics.json")["eval"]["eval_agreement"]
    assert report["student"]["top1_agreement"] == trained
    check("`distill eval` measures R (`teacher_tokens_per_student_token`; {} on the tiny pair's held-out text)",
          report["tokenizers"]["teacher_tokens_per_student_token"])  # fmt: skip
