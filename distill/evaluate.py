"""The `distill eval` job: teacher and student side by side, quality next to cost, on held-out data.

Per model, over the target tokens of the data (labels != -100, the tokens training is scored on):

- perplexity = exp(mean cross-entropy), each model over its own full output layer;
- for the student, top-1 agreement with the teacher (how often the two argmaxes match) and the mean
  KL(teacher || student) in nats per token, at temperature 1 over the ids the two heads share, as in
  `distill.losses`;
- measured forward throughput (real tokens per second of the eval batches, padding not counted);
- FLOPs per generated token, measured by the cost meter (`distill.flops`) on one forward pass of
  ``max_length`` tokens divided by ``max_length``: 2N + 4 L s d, the cost of a token that attends to
  a context of s = max_length positions;
- $ per 1M generated tokens = FLOPs for 1M tokens / (peak FLOP/s x MFU) in hours x $ per GPU-hour,
  the same model as `distill cost`, so the two agree.

A teacher with another tokenizer is compared on the text (`distill.xtoken`): each row is tokenised by
both (`distill.data.tokenize_pair`), each model is scored on its own target tokens, and

- bits per byte = NLL (nats, summed over the model's target tokens, end markers included) / ln 2 /
  the UTF-8 bytes of text those tokens spell (`xtoken.new_bytes`): the quality figure on one scale;
- top-1 agreement and KL are taken at aligned target positions only (a student position and a teacher
  position predicting what follows the same byte): agreement = the student's top-1 sent through the
  vocabulary map is the teacher's top-1 (training's eval_agreement), KL = KL(teacher || student
  projected into the teacher's vocabulary) over the teacher's whole vocabulary; the unaligned target
  positions are counted in the report;
- FLOPs per byte = FLOPs per token x target tokens / bytes. Per-token figures (perplexity, FLOPs and $
  per token, tokens/s) count different tokens on the two sides: they are reported without a ratio.

With the training run's output dir, the report adds the loss curves (the Trainer's log history) and
the training cost (its cost_report.json), and says after how many served tokens the student has paid
for its training. Writes eval_report.json, eval_report.md, loss_curves.png and quality_vs_cost.png.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill import cost, xtoken
from distill.config import DTYPES
from distill.console import bar, quiet_libraries
from distill.data import Collator, check_has_targets, detect_format, load_rows, pair_of, teacher_length, tokenize
from distill.errors import UserError
from distill.flops import FlopMeter
from distill.generate import complete, prompts_from_rows, read_prompts, render
from distill.losses import (
    IGNORE_INDEX,
    shared_vocab,
    shift_for_causal_lm,
    teacher_topk,
    token_divergence,
    top1_agreement,
    xtoken_token_divergence,
)
from distill.models import load_model, load_tokenizer, resolve, same_tokenizer, vocab_sizes_fit

ROLES = ("teacher", "student")


def adapter_base(name_or_path: str) -> str | None:
    """The base model of a LoRA adapter folder (what `distill finetune` saves with use_peft), else None."""
    path = Path(name_or_path)
    if not (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return None
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(name_or_path).base_model_name_or_path
    try:
        resolve(base)
    except UserError as err:
        raise UserError(f"the base model of adapter {name_or_path}: {err}; merge it first (distill merge)") from err
    return base


def load_eval_model(name_or_path: str, dtype: str):
    """A model for inference. An adapter is loaded onto its base and merged in memory, so that it runs
    (and is timed and counted) as the plain model `distill merge` would make of it."""
    placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
    base = adapter_base(name_or_path)
    if base is None:
        model = load_model(name_or_path, dtype, **placement)
    else:
        from peft import PeftModel

        from distill.adapters import quiet_peft_wrapping

        with quiet_peft_wrapping():
            model = PeftModel.from_pretrained(load_model(base, dtype, **placement), name_or_path).merge_and_unload()
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# Measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``model``'s logits on the batch, and the wall seconds of its forward (the device synchronised on
    both sides, so that queued work is not timed to the wrong model)."""
    ids, mask = ids.to(model.device), mask.to(model.device)
    _sync(model.device)
    start = time.perf_counter()
    logits = model(input_ids=ids, attention_mask=mask).logits
    _sync(model.device)
    return logits, time.perf_counter() - start


@torch.no_grad()
def score(teacher, student, batches, total: int | None = None) -> dict:
    """Sums over the target tokens of ``batches``: per-model NLL and forward seconds, student/teacher
    KL and top-1 matches, target tokens and real (unpadded) tokens."""
    sums = {"nll_teacher": 0.0, "nll_student": 0.0, "kl": 0.0, "matches": 0, "targets": 0, "tokens": 0}
    seconds = dict.fromkeys(ROLES, 0.0)
    for batch in bar(iterable=batches, total=total, desc="eval", unit="batch"):
        logits = {}
        for role, model in zip(ROLES, (teacher, student)):
            logits[role], spent = timed_logits(model, batch["input_ids"], batch["attention_mask"])
            seconds[role] += spent
        device = logits["student"].device
        t_logits, s_logits = logits["teacher"].to(device), logits["student"]
        labels = batch["labels"].to(device)
        for role, lg in (("teacher", t_logits), ("student", s_logits)):
            flat, y = shift_for_causal_lm(lg, labels)
            sums[f"nll_{role}"] += F.cross_entropy(flat.float(), y, ignore_index=IGNORE_INDEX, reduction="sum").item()
        s_shared, t_shared = shared_vocab(s_logits, t_logits)
        s_flat, y = shift_for_causal_lm(s_shared, labels)
        t_flat, _ = shift_for_causal_lm(t_shared, labels)
        target = y.ne(IGNORE_INDEX)
        sums["kl"] += token_divergence(s_flat[target], t_flat[target], "forward_kl").sum().item()
        matches, targets = top1_agreement(s_shared.argmax(-1), t_shared.argmax(-1), labels)
        sums["matches"] += int(matches)
        sums["targets"] += int(targets)
        sums["tokens"] += int(batch["attention_mask"].sum())
    return sums | {f"seconds_{role}": s for role, s in seconds.items()}


# ---------------------------------------------------------------------------------------------------
# Across tokenizers: each model on its own tokens, compared at aligned positions and per byte of text


def pair_row(row: dict, tokenizer, teacher_tokenizer, max_length: int, teacher_max_length: int) -> dict:
    """`distill.data.tokenize_pair`'s row (the student's ids and labels, the teacher's ids, the alignment)
    plus what eval scores on each side: ``teacher_labels``, the teacher's own targets (the same text's
    completion, assistant turns or whole text, as `xtoken.encode` marks them), and per token the new
    bytes of visible text it spells (`xtoken.new_bytes`): ``bytes``, ``teacher_bytes``."""
    student, teacher = xtoken.encode(tokenizer, row, "student"), xtoken.encode(teacher_tokenizer, row, "teacher")
    out = pair_of(student, teacher, max_length, teacher_max_length)
    out["bytes"] = xtoken.new_bytes(student.pieces)[:max_length]
    out["teacher_bytes"] = xtoken.new_bytes(teacher.pieces)[:teacher_max_length]
    labels = [t if target else IGNORE_INDEX for t, target in zip(teacher.ids, teacher.target)]
    out["teacher_labels"] = labels[:teacher_max_length]
    return out


def pair_data(rows, tokenizer, teacher_tokenizer, max_length: int, teacher_max_length: int, name: str):
    """Held-out rows for a teacher with another tokenizer, one document per row (`pair_row`); the
    teacher's side is cut at ``teacher_max_length`` (`distill.data.teacher_length`, as `distill train`
    cuts it); a cut teacher position leaves its student position unaligned."""
    fmt = detect_format(rows, name)
    if fmt == "prompt":
        raise UserError(f"{name} has a `prompt` column but no `completion`: held-out data needs completions to score")
    check_has_targets(rows, fmt, name)
    kw = {"tokenizer": tokenizer, "teacher_tokenizer": teacher_tokenizer, "max_length": max_length,
          "teacher_max_length": teacher_max_length}  # fmt: skip
    out = rows.map(pair_row, fn_kwargs=kw, remove_columns=rows.column_names, desc=f"Tokenizing {name} for both")
    out = out.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"][1:]), desc="Dropping targetless rows")
    if len(out) == 0:
        raise UserError(f"{name} has no target tokens after tokenization (check --max_length and the columns)")
    return out


class PairCollator:
    """`distill.data.Collator` for `pair_row` rows, with ``teacher_labels`` (padded with -100) and the
    byte counts (padded with 0) on the widths the collator gave each side."""

    def __init__(self, pad_token_id: int, teacher_pad_token_id: int):
        self.collate = Collator(pad_token_id, teacher_pad_token_id=teacher_pad_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collate(rows)
        for key, like, pad in (("bytes", "input_ids", 0), ("teacher_bytes", "teacher_input_ids", 0),
                               ("teacher_labels", "teacher_input_ids", IGNORE_INDEX)):  # fmt: skip
            batch[key] = torch.full_like(batch[like], pad)
            for i, r in enumerate(rows):
                batch[key][i, : len(r[key])] = torch.tensor(r[key])
        return batch


@torch.no_grad()
def score_across(teacher, student, batches, vocab_map: xtoken.VocabMap, total: int | None = None) -> dict:
    """`score` for a teacher with another tokenizer. Sums, each model over its own target tokens: NLL,
    target tokens and the bytes of text they spell (bits per byte = NLL / ln 2 / bytes); at the student
    target positions with an aligned teacher position: top-1 matches through the vocabulary map
    (`xtoken.mapped_agreement`, training's eval_agreement) and the projected KL(teacher || student) over
    the teacher's whole vocabulary (`distill.losses.xtoken_token_divergence`, method ``projected``: the
    student's distribution pushed through the map; with identical tokenizers, the plain KL); and the
    aligned and all student target positions."""
    keys = ("nll_teacher", "nll_student", "bytes_teacher", "bytes_student", "targets_teacher", "targets",
            "aligned", "matches", "kl", "tokens", "tokens_teacher")  # fmt: skip
    sums = dict.fromkeys(keys, 0)  # counts stay ints; the NLL and KL sums become floats
    seconds = dict.fromkeys(ROLES, 0.0)
    v_s, v_t = vocab_map.ids.shape[0], vocab_map.teacher_vocab_size
    for batch in bar(iterable=batches, total=total, desc="eval", unit="batch"):
        logits = {}
        for role, model, prefix in (("teacher", teacher, "teacher_"), ("student", student, "")):
            logits[role], spent = timed_logits(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])
            seconds[role] += spent
        device = logits["student"].device
        s_logits, t_logits = logits["student"], logits["teacher"].to(device)
        labels, alignment = batch["labels"].to(device), batch["alignment"].to(device)
        for role, lg, prefix in (("teacher", t_logits, "teacher_"), ("student", s_logits, "")):
            y = batch[f"{prefix}labels"].to(device)
            flat, shifted = shift_for_causal_lm(lg, y)
            sums[f"nll_{role}"] += F.cross_entropy(
                flat.float(), shifted, ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            target = y[:, 1:].ne(IGNORE_INDEX)
            sums[f"bytes_{role}"] += int(batch[f"{prefix}bytes"][:, 1:].to(device)[target].sum())
            sums["targets" if role == "student" else "targets_teacher"] += int(target.sum())
        # Each side's argmax over its own tokenizer's ids (a padded head's extra rows are no token).
        matches, aligned = xtoken.mapped_agreement(
            s_logits[..., :v_s].argmax(-1), t_logits[..., :v_t].argmax(-1), labels, alignment, vocab_map
        )
        sums["matches"] += int(matches)
        sums["aligned"] += int(aligned)
        where = alignment[:, :-1]
        rows = labels[:, 1:].ne(IGNORE_INDEX) & where.ge(0)
        row_of = torch.arange(len(rows), device=device)[:, None].expand_as(rows)[rows]
        s_rows, t_rows = s_logits[:, :-1][rows], t_logits[row_of, where[rows], :v_t]
        chunk = max(1, 2**24 // v_t)  # the teacher's whole distribution (k = its vocabulary, no tail), sorted
        for i in range(0, len(t_rows), chunk):  # a chunk of rows at a time
            whole = teacher_topk(t_rows[i : i + chunk], v_t)
            kl = xtoken_token_divergence(s_rows[i : i + chunk], whole, vocab_map, "projected", "forward_kl")
            sums["kl"] += kl.sum().item()
        sums["tokens"] += int(batch["attention_mask"].sum())
        sums["tokens_teacher"] += int(batch["teacher_attention_mask"].sum())
    return sums | {f"seconds_{role}": s for role, s in seconds.items()}


@torch.no_grad()
def forward_flops_per_token(model, seq_len: int) -> float:
    """Measured FLOPs of one forward pass over ``seq_len`` tokens, per token: what a generated token
    costs when it attends to a context of ``seq_len`` positions (the cost meter's convention)."""
    ids = torch.zeros((1, seq_len), dtype=torch.long, device=model.device)
    meter = FlopMeter()
    with meter.measure("forward", {"input_ids": ids}):
        model(input_ids=ids)
    return meter.flops["forward"] / seq_len


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied embedding counts once


def usd_per_million(flops_per_token: float, peak_tflops: float, mfu: float, price: float | None) -> float | None:
    return None if price is None else cost.gpu_hours(1e6 * flops_per_token, peak_tflops, mfu) * price


def eval_prompts(prompt_file: str | None, rows, data: str, n: int) -> list:
    """Prompts for the side-by-side generations: the prompt file's, else the data's own (its `prompt`
    column, a conversation without its last answer, or the first eight words of a text)."""
    if prompt_file:
        return [p["prompt"] for p in read_prompts(prompt_file, n)]
    prompts = [p["prompt"] for p in prompts_from_rows(rows, data, n)]
    if not {"prompt", "messages"} & set(rows.column_names):
        prompts = [" ".join(p.split()[:8]) for p in prompts]
    return prompts


# ---------------------------------------------------------------------------------------------------
# The training run


def read_log_history(run_dir: str) -> list[dict]:
    """The Trainer's log history of a run: its trainer_state.json, or that of its newest checkpoint.

    `distill train` and `finetune` evaluate before and after training, outside the log that
    checkpoints keep (`Trainer.train` starts a fresh one); both evaluations are in the run's
    metrics.json, and are put back at step 0 and at the last step.
    """
    from transformers.trainer_utils import get_last_checkpoint

    path = Path(run_dir)
    if path.is_file():
        state = path
    elif (path / "trainer_state.json").is_file():
        state = path / "trainer_state.json"
    elif path.is_dir() and (last := get_last_checkpoint(str(path))):
        state = Path(last) / "trainer_state.json"
    else:
        raise UserError(
            f"--run_dir {run_dir}: no trainer_state.json in it or in a checkpoint-* folder; give the output_dir "
            "of a distill train / finetune run (with save_steps, so it has checkpoints) or a trainer_state.json"
        )
    history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    metrics = (path if path.is_dir() else path.parent) / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text(encoding="utf-8"))
        for key, step in (("eval_before", 0), ("eval", m.get("global_step"))):
            point = {
                k.replace("eval_before_", "eval_", 1): v for k, v in (m.get(key) or {}).items() if k.startswith("eval_")
            }
            if point and step is not None and not any(h.get("step") == step and "eval_loss" in h for h in history):
                history.append({"step": step, **point})
    return sorted(history, key=lambda h: h.get("step", 0))


def read_training_cost(run_dir: str) -> dict | None:
    path = Path(run_dir)
    path = path if path.is_dir() else path.parent
    found = path / "cost_report.json"
    return json.loads(found.read_text(encoding="utf-8")) if found.is_file() else None


# ---------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot, no global backend state, no display needed)

CURVES = ("loss", "kd_loss", "ce_loss", "eval_loss", "eval_kd_loss", "eval_ce_loss")


def plot_loss_curves(history: list[dict], path: Path) -> list[str]:
    """Losses per step (training solid, held-out dashed) and, when logged, held-out agreement with the
    teacher; returns the metrics drawn."""
    from matplotlib.figure import Figure

    series = {k: [(h["step"], h[k]) for h in history if k in h and "step" in h] for k in (*CURVES, "eval_agreement")}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return []
    drawn = list(series)
    agreement = series.pop("eval_agreement", None)
    fig = Figure(figsize=(10 if agreement else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if agreement else 1, squeeze=False)[0]
    for key, points in series.items():
        steps, values = zip(*points)
        held_out = key.startswith("eval_")
        color = f"C{CURVES.index(key.removeprefix('eval_'))}"  # a loss and its held-out twin share a colour
        axes[0].plot(steps, values, "--" if held_out else "-", color=color, label=key,
                     marker="o" if held_out or len(points) < 3 else None, markersize=4)  # fmt: skip
    axes[0].set(xlabel="step", ylabel="nats per target token", title="training and held-out losses")
    axes[0].legend()
    if agreement:
        steps, values = zip(*agreement)
        axes[1].plot(steps, values, marker="o", markersize=4, color="tab:green")
        axes[1].set(
            xlabel="step", ylabel="fraction of target tokens", title="held-out top-1 agreement with the teacher"
        )
        axes[1].set_ylim(0, 1)
    fig.savefig(path, dpi=120)
    return drawn


def plot_quality_vs_cost(models: dict, compared: list[dict], path: Path, context: int, cross: bool = False) -> None:
    """Held-out perplexity against FLOPs per generated token (across tokenizers: bits per byte against
    FLOPs per byte of text, the units both models share): the teacher, the student, and the students of
    earlier reports, each with an arrow to this student (fine-tuning moves a student up or down, never
    sideways: its cost per token stays)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    x_key, y_key = ("flops_per_byte", "bits_per_byte") if cross else ("flops_per_token", "perplexity")

    def label(name, m):
        usd = m["usd_per_million_tokens"]
        return f"{name} ({m['parameters'] / 1e6:.3g}M params" + (f", ${usd:.3g}/1M tok)" if usd is not None else ")")

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    here = (models["student"][x_key], models["student"][y_key])
    for i, c in enumerate(compared):
        xy = (c[x_key], c[y_key])
        ax.scatter(*xy, s=50, marker="s", color=f"C{i + 2}", label=label(f"earlier: {c['label']}", c), zorder=3)
        ax.annotate("", xy=here, xytext=xy, arrowprops={"arrowstyle": "->", "color": "0.5"})
    for role, color in (("teacher", "C0"), ("student", "C1")):
        m = models[role]
        ax.scatter(m[x_key], m[y_key], s=70, color=color, label=label(f"{role}: {m['path']}", m), zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.3, y=0.3)
    unit = "byte of text" if cross else "generated token"
    ax.set(
        xlabel=f"FLOPs per {unit} (context {context})  \u2192 more expensive",
        ylabel=("held-out bits per byte" if cross else "held-out perplexity") + "  \u2192 worse",
        title="quality vs cost (lower left is better)" + (" across tokenizers" if cross else ""),
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------
# The job


def default_output_dir(run_dir: str | None, student: str) -> Path:
    base = Path(run_dir or student)
    return base / "eval" if base.is_dir() else Path("eval")


def run(args) -> dict:
    """`distill eval` for the parsed command line; returns the report written to eval_report.json."""
    if args.max_length < 2:
        raise UserError(f"--max_length must be at least 2, got {args.max_length}")
    if args.batch_size < 1 or args.num_prompts < 0 or args.max_new_tokens < 1:
        raise UserError("--batch_size and --max_new_tokens must be at least 1, --num_prompts at least 0")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu is a fraction of the peak in (0, 1], got {args.mfu}")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r} is not a dtype distill knows; use one of {', '.join(DTYPES)}")
    accelerator, peak = (args.accelerator, args.peak_tflops) if args.peak_tflops else cost.peak_for(args.accelerator)
    quiet_libraries(args.data)
    for name in (args.teacher, args.student):
        resolve(adapter_base(name) or name)
    history = read_log_history(args.run_dir) if args.run_dir else None
    out = Path(args.output_dir) if args.output_dir else default_output_dir(args.run_dir, args.student)

    tokenizer = load_tokenizer(adapter_base(args.student) or args.student)  # an adapter keeps its base's tokenizer
    teacher_tokenizer = load_tokenizer(args.teacher)
    cross = not same_tokenizer(tokenizer, teacher_tokenizer)
    if cross:  # compared at byte-aligned positions (distill.xtoken), which needs both sides' offsets
        xtoken.check_offsets(tokenizer, "student")
        xtoken.check_offsets(teacher_tokenizer, "teacher")
    rows = load_rows(args.data, split=args.split)
    if args.max_samples is not None:
        rows = rows.select(range(min(args.max_samples, len(rows))))
    name = f"eval data {args.data}"
    if cross:
        cut = teacher_length(args.teacher, args.max_length)
        data = pair_data(rows, tokenizer, teacher_tokenizer, args.max_length, cut, name)
        # The map `distill train` builds for this pair and data.
        pins = xtoken.pinned_pairs(detect_format(rows, name), tokenizer, teacher_tokenizer)
        vocab_map = xtoken.build_vocab_map(tokenizer, teacher_tokenizer, special_pairs=pins)
    else:
        data = tokenize(rows, tokenizer, args.max_length, name)
    same_data = {"path": Path(args.data).name, "split": args.split, "rows": len(rows), "max_length": args.max_length}
    compared = [_read_report(p, same_data, cross) for p in args.compare]
    prompts = eval_prompts(args.prompts, rows, args.data, args.num_prompts) if args.num_prompts else []

    teacher, student = load_eval_model(args.teacher, args.dtype), load_eval_model(args.student, args.dtype)
    if cross:
        vocab_sizes_fit(tokenizer, student)
        vocab_sizes_fit(teacher_tokenizer, teacher)
    else:
        vocab_sizes_fit(tokenizer, student, teacher)

    # Counted first: the one counted forward pass also warms each model up before it is timed.
    flops = {role: forward_flops_per_token(m, args.max_length) for role, m in zip(ROLES, (teacher, student))}
    collate = (
        PairCollator(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)
        if cross
        else Collator(tokenizer.pad_token_id)
    )
    batches = (collate([data[j] for j in range(i, min(i + args.batch_size, len(data)))])
               for i in range(0, len(data), args.batch_size))  # fmt: skip
    n_batches = math.ceil(len(data) / args.batch_size)
    if cross:
        sums = score_across(teacher, student, batches, vocab_map, total=n_batches)
    else:
        sums = score(teacher, student, batches, total=n_batches)

    models = {}
    for role, model, name in (("teacher", teacher, args.teacher), ("student", student, args.student)):
        fpt = flops[role]
        targets = sums["targets_teacher" if cross and role == "teacher" else "targets"]
        tokens = sums["tokens_teacher" if cross and role == "teacher" else "tokens"]
        mean_ce = sums[f"nll_{role}"] / targets
        models[role] = {
            "path": name,
            "parameters": parameters(model),
            "mean_cross_entropy": mean_ce,
            "perplexity": math.exp(mean_ce),
            "tokens_per_second": tokens / sums[f"seconds_{role}"],
            "flops_per_token": fpt,
            "usd_per_million_tokens": usd_per_million(fpt, peak, args.mfu, args.price_per_gpu_hour),
        }
        if cross:
            models[role] |= per_byte(sums[f"nll_{role}"], targets, sums[f"bytes_{role}"], fpt)
    if cross:
        models["student"]["top1_agreement"] = sums["matches"] / sums["aligned"] if sums["aligned"] else None
        models["student"]["kl_teacher_student"] = sums["kl"] / sums["aligned"] if sums["aligned"] else None
        models["student"]["aligned_targets"] = int(sums["aligned"])
        models["student"]["aligned_share"] = sums["aligned"] / sums["targets"]
    else:
        models["student"]["top1_agreement"] = sums["matches"] / sums["targets"]
        models["student"]["kl_teacher_student"] = sums["kl"] / sums["targets"]

    generations = []
    if prompts:
        chat = any(isinstance(p, list) for p in prompts)
        outs = {  # each model reads the prompt in its own tokens (and, for chat, its own template)
            role: complete(model, tok, [render(p, chat, tok) for p in prompts], max_new_tokens=args.max_new_tokens,
                           chat=chat)
            for role, model, tok in (("teacher", teacher, teacher_tokenizer), ("student", student, tokenizer))
        }  # fmt: skip
        generations = [
            {"prompt": p, "teacher": outs["teacher"][i][0], "student": outs["student"][i][0]}
            for i, p in enumerate(prompts)
        ]

    t, s = models["teacher"], models["student"]
    report = {
        "teacher": t,
        "student": s,
        "student_over_teacher": ratios(t, s, cross),
        "tokenizers": tokenizers_section(tokenizer, teacher_tokenizer, sums, args.max_length) if cross else {
            "differ": False},
        "data": {**same_data, "path": args.data, "sequences": len(data),
                 "target_tokens": sums["targets"], "tokens": sums["tokens"], "max_length": args.max_length},
        "settings": {"device": str(student.device), "dtype": str(student.dtype).removeprefix("torch."),
                     "batch_size": args.batch_size, "accelerator": accelerator, "peak_tflops": peak, "mfu": args.mfu,
                     "price_per_gpu_hour": args.price_per_gpu_hour, "context": args.max_length},
        "generations": generations,
        "training": None,
        "compared": [{"label": c["label"], **c["student"]} for c in compared],
        "files": {},
    }  # fmt: skip
    if args.run_dir:
        report["training"] = training_section(args.run_dir, history, t, s, cross)

    out.mkdir(parents=True, exist_ok=True)
    if history and (drawn := plot_loss_curves(history, out / "loss_curves.png")):
        report["files"]["loss_curves"] = "loss_curves.png"
        report["training"]["plotted"] = drawn
    plot_quality_vs_cost(models, report["compared"], out / "quality_vs_cost.png", args.max_length, cross)
    report["files"]["quality_vs_cost"] = "quality_vs_cost.png"
    report["files"] |= {"json": "eval_report.json", "markdown": "eval_report.md"}

    (out / "eval_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "eval_report.md").write_text(render_markdown(report), encoding="utf-8")
    print(render_summary(report, out))
    return report


def per_byte(nll: float, targets: float, nbytes: float, flops_per_token: float) -> dict:
    """A model's numbers per byte of the text it scored, comparable across tokenizers:
    bits per byte = NLL (nats, summed over its target tokens) / ln 2 / bytes, and FLOPs per byte =
    FLOPs per token x its target tokens / bytes."""
    return {
        "target_tokens": int(targets),
        "target_bytes": int(nbytes),
        "bits_per_byte": nll / math.log(2) / nbytes,
        "flops_per_byte": flops_per_token * targets / nbytes,
    }


def ratios(t: dict, s: dict, cross: bool) -> dict:
    """Student / teacher. Across tokenizers per-token numbers count different tokens, so the per-byte
    ones stand in for them (perplexity, FLOPs per token and tokens/s have no ratio there)."""
    if cross:
        keys = ("parameters", "flops_per_byte", "bits_per_byte")
    else:
        keys = ("parameters", "flops_per_token", "perplexity", "tokens_per_second")
    return {k: s[k] / t[k] for k in keys}


def tokenizers_section(tokenizer, teacher_tokenizer, sums: dict, max_length: int) -> dict:
    return {
        "differ": True,
        "student": {"tokens": len(tokenizer), "hash": xtoken.tokenizer_hash(tokenizer)},
        "teacher": {"tokens": len(teacher_tokenizer), "hash": xtoken.tokenizer_hash(teacher_tokenizer)},
        "teacher_max_length": 2 * max_length,
        "student_targets": int(sums["targets"]),
        "aligned_targets": int(sums["aligned"]),
        "unaligned_targets": int(sums["targets"] - sums["aligned"]),
        "teacher_tokens_per_student_token": sums["targets_teacher"] / sums["targets"],
    }


def _read_report(path: str, data: dict, cross: bool) -> dict:
    """An earlier report's student, if it was measured on the same held-out data, against a teacher of the
    same tokenizer kind: points measured on different data, or across tokenizers against within one
    (per byte against per token), are not comparable."""
    p = Path(path)
    p = p / "eval_report.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"--compare {path}: no eval_report.json there; give a report an earlier `distill eval` wrote")
    report = json.loads(p.read_text(encoding="utf-8"))
    theirs = {k: Path(v).name if k == "path" else v for k, v in report["data"].items() if k in data}
    if theirs != data:
        raise UserError(
            f"--compare {path} was measured on other data ({theirs}, here {data}); run both with the same "
            "--data, --split, --max_samples and --max_length"
        )
    theirs_cross = report.get("tokenizers", {}).get("differ", False)
    if theirs_cross != cross:
        mode = {True: "across tokenizers", False: "with one tokenizer"}
        raise UserError(
            f"--compare {path} compared its student to a teacher {mode[theirs_cross]}, this report {mode[cross]}: "
            "their numbers are not on one scale; compare reports of one kind"
        )
    return {"label": report["student"]["path"], "student": report["student"]}


def training_section(run_dir: str, history: list[dict], teacher: dict, student: dict, cross: bool = False) -> dict:
    """The run's final logged numbers and, from its cost_report.json, what training cost and when the
    student's cheaper tokens have paid for it (across tokenizers: bytes of text, the unit both share)."""

    def last(key):
        return next((h[key] for h in reversed(history) if key in h), None)

    section = {"run_dir": run_dir, "steps": last("step"),
               "final": {k: last(k) for k in (*CURVES, "eval_agreement") if last(k) is not None}}  # fmt: skip
    spent = read_training_cost(run_dir)
    if spent:
        flops = spent["flops"]["total"]
        unit = "byte" if cross else "token"
        saved = teacher[f"flops_per_{unit}"] - student[f"flops_per_{unit}"]
        section["cost"] = {
            "flops": flops,
            "prune_flops": spent["flops"].get("prune", 0),  # in flops: the `distill prune` pass that made it
            "pflops_days": spent["pflops_days"]["total"],
            "wall_seconds": spent["wall_seconds"],
            "cost_usd": spent.get("cost_usd"),
            f"breakeven_{unit}s": flops / saved if saved > 0 else None,
        }
    return section


# ---------------------------------------------------------------------------------------------------
# Reports


def _f(x, spec=".4g") -> str:
    return "-" if x is None else format(x, spec)


def _big(x) -> str:
    """1982464.0 -> '1.982e6'; below a million written out: 365,312."""
    if x is None:
        return "-"
    if abs(x) < 1e6:
        return f"{x:,.0f}"
    mantissa, exp = f"{x:.3e}".split("e")
    return f"{mantissa}e{int(exp)}"


def _usd(x) -> str:
    return "-" if x is None else f"${x:.3g}"


def render_markdown(r: dict) -> str:
    t, s, ratio, d, st = r["teacher"], r["student"], r["student_over_teacher"], r["data"], r["settings"]
    price = (
        f"at ${st['price_per_gpu_hour']:g}/GPU-hour on {st['accelerator']} ({st['peak_tflops']:g} TFLOP/s) at "
        f"{st['mfu']:.0%} MFU"
        if st["price_per_gpu_hour"] is not None
        else "(give --gpu_hour_price)"
    )
    cross = r.get("tokenizers", {}).get("differ", False)
    rows = _cross_rows(r, price) if cross else [
        ("parameters", f"{t['parameters']:,}", f"{s['parameters']:,}", f"{ratio['parameters']:.3g}x"),
        ("perplexity", _f(t["perplexity"]), _f(s["perplexity"]), f"{ratio['perplexity']:.3g}x"),
        ("mean cross-entropy, nats/token", _f(t["mean_cross_entropy"]), _f(s["mean_cross_entropy"]), ""),
        ("top-1 agreement with the teacher", "1", _f(s["top1_agreement"], ".3f"), ""),
        ("KL(teacher \u2016 student), nats/token", "0", _f(s["kl_teacher_student"]), ""),
        (f"forward tokens/s (measured, {st['device']})", f"{t['tokens_per_second']:,.0f}",
         f"{s['tokens_per_second']:,.0f}", f"{ratio['tokens_per_second']:.3g}x"),
        (f"FLOPs per generated token (context {st['context']})", _big(t["flops_per_token"]),
         _big(s["flops_per_token"]), f"{ratio['flops_per_token']:.3g}x"),
        (f"$ per 1M generated tokens {price}", _usd(t["usd_per_million_tokens"]),
         _usd(s["usd_per_million_tokens"]), ""),
    ]  # fmt: skip
    lines = [
        f"# distill eval: `{s['path']}` vs its teacher `{t['path']}`",
        "",
        (
            f"Held out: `{d['path']}` ({d['rows']} rows, {d['sequences']} sequences of at most {d['max_length']} "
            f"tokens, {d['target_tokens']:,} target tokens), {st['dtype']} on {st['device']}."
        ),
        "",
        *([_cross_note(r["tokenizers"]), ""] if cross else []),
        "| | teacher | student | student / teacher |",
        "|---|---:|---:|---:|",
        *[f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows],
        "",
        CROSS_TEXT if cross else (
            "Perplexity is exp(mean cross-entropy) on the target tokens. Agreement: how often the student's most "
            "likely next token is the teacher's. KL: how far the student's next-token distribution is from the "
            "teacher's, in nats per token (0 = the same). FLOPs per token are measured on one forward pass "
            "(2N + 4Lsd: weights plus attention over the context); $ follow from them at the stated peak and MFU."
        ),
    ]  # fmt: skip
    if r["compared"]:
        quality, cost_key = ("bits_per_byte", "flops_per_byte") if cross else ("perplexity", "flops_per_token")
        head = "| student | bits/byte | agreement | KL | FLOPs/byte |" if cross else (
            "| student | perplexity | agreement | KL | FLOPs/token |")  # fmt: skip
        lines += ["", "Compared with earlier reports:", "", head, "|---|---:|---:|---:|---:|"]
        for c in [*r["compared"], {**s, "label": s["path"] + " (this report)"}]:
            lines.append(
                f"| `{c['label']}` | {_f(c[quality])} | {_f(c.get('top1_agreement'), '.3f')} | "
                f"{_f(c.get('kl_teacher_student'))} | {_big(c[cost_key])} |"
            )
    if r["training"]:
        tr = r["training"]
        final = ", ".join(f"{k} {v:.4g}" for k, v in tr["final"].items())
        lines += [
            "",
            "## Training",
            "",
            f"`{tr['run_dir']}`: {tr['steps']} steps; last logged (eval_* on the run's own eval data): {final}.",
        ]
        if "cost" in tr:
            c = tr["cost"]
            unit = "bytes of text" if cross else "tokens"
            be = c["breakeven_bytes" if cross else "breakeven_tokens"]
            lines.append(
                "Training compute (teacher forwards + student steps"
                + (f" + the `distill prune` pass, {_big(c['prune_flops'])}" if c.get("prune_flops") else "")
                + f", measured): {_big(c['flops'])} FLOPs = "
                f"{c['pflops_days']:.3g} PFlop/s-days in {c['wall_seconds']:,.0f} s"
                + (f", {_usd(c['cost_usd'])}" if c["cost_usd"] is not None else "")
                + (f". The student pays for its training after serving {_big(be)} {unit} in place of the teacher."
                   if be else f". The student is not cheaper per {'byte' if cross else 'token'} than the teacher.")
            )  # fmt: skip
    figures = r["files"]
    lines += ["", "## Figures", ""]
    if "loss_curves" in figures:
        lines += ["![loss curves](loss_curves.png)", "", loss_curves_text(r["training"]["plotted"]), ""]
    lines += [
        "![quality vs cost](quality_vs_cost.png)",
        "",
        (
            "Each model is a point: FLOPs per byte of text (right = more expensive to serve) against held-out bits "
            "per byte (up = worse), the units two tokenizers share. "
            if cross
            else "Each model is a point: FLOPs per generated token (right = more expensive to serve) against held-out "
            "perplexity (up = worse). "
        )
        + "Distillation pays when the student sits far left of the teacher and not much higher"
        + ("; squares are the students of the earlier reports, with an arrow to this one." if r["compared"] else "."),
    ]
    if r["generations"]:
        lines += ["", "## Greedy generations", ""]
        for g in r["generations"]:
            prompt = g["prompt"] if isinstance(g["prompt"], str) else g["prompt"][-1]["content"]
            lines += [f"**{_quote(prompt)}**", "", f"- teacher: {_quote(g['teacher'])}",
                      f"- student: {_quote(g['student'])}", ""]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


CROSS_TEXT = (
    "The tokenizers differ, so each model's perplexity and cross-entropy are per its own tokens and are not "
    "compared; bits per byte are: the NLL of each model's target tokens (end markers included), in bits, over "
    "the UTF-8 bytes of text those tokens spell. Agreement is per aligned target position (a student position and "
    "a teacher position predicting what follows the same byte of text): the student's most likely next token, "
    "sent to the teacher token that begins it (the vocabulary map), is the teacher's most likely one; training's "
    "eval_agreement is the same number. KL: the teacher's distribution against the student's pushed through "
    "that map, over the teacher's whole vocabulary, nats per aligned position. Target positions with no teacher "
    "position are in neither and are counted above. FLOPs per token are each model's own (one forward pass, "
    "2N + 4Lsd), per byte they are FLOPs per token x target tokens / bytes."
)


def _cross_note(tk: dict) -> str:
    unaligned = tk["unaligned_targets"]
    return (
        f"**The tokenizers differ** (student {tk['student']['tokens']:,} tokens, teacher {tk['teacher']['tokens']:,}; "
        f"the teacher needs {tk['teacher_tokens_per_student_token']:.3g}x the target tokens for the same text). "
        f"{tk['aligned_targets']:,} of the student's {tk['student_targets']:,} target tokens have an aligned teacher "
        f"position; {unaligned:,} ({unaligned / tk['student_targets']:.1%}) have none and are left out of agreement "
        "and KL."
    )


def _cross_rows(r: dict, price: str) -> list[tuple[str, str, str, str]]:
    t, s, ratio, st = r["teacher"], r["student"], r["student_over_teacher"], r["settings"]
    return [
        ("parameters", f"{t['parameters']:,}", f"{s['parameters']:,}", f"{ratio['parameters']:.3g}x"),
        ("bits per byte of target text", _f(t["bits_per_byte"]), _f(s["bits_per_byte"]),
         f"{ratio['bits_per_byte']:.3g}x"),
        ("target bytes scored", f"{t['target_bytes']:,}", f"{s['target_bytes']:,}", ""),
        ("target tokens (each its own tokenizer's)", f"{t['target_tokens']:,}", f"{s['target_tokens']:,}", ""),
        ("perplexity per own token (not comparable)", _f(t["perplexity"]), _f(s["perplexity"]), ""),
        ("top-1 agreement with the teacher, aligned positions", "1", _f(s["top1_agreement"], ".3f"), ""),
        ("KL(teacher \u2016 student through the map), nats/aligned position", "0", _f(s["kl_teacher_student"]), ""),
        (f"forward tokens/s, own tokens (measured, {st['device']})", f"{t['tokens_per_second']:,.0f}",
         f"{s['tokens_per_second']:,.0f}", ""),
        (f"FLOPs per own token (context {st['context']})", _big(t["flops_per_token"]), _big(s["flops_per_token"]), ""),
        ("FLOPs per byte of text", _big(t["flops_per_byte"]), _big(s["flops_per_byte"]),
         f"{ratio['flops_per_byte']:.3g}x"),
        (f"$ per 1M own tokens {price}", _usd(t["usd_per_million_tokens"]), _usd(s["usd_per_million_tokens"]), ""),
    ]  # fmt: skip


def loss_curves_text(drawn: list[str]) -> str:
    text = "Training loss (solid) and held-out loss (dashed; step 0 is before training) per step"
    if "kd_loss" in drawn:
        text += (
            "; `kd_loss` is the T\u00b2-scaled divergence from the teacher, `ce_loss` the cross-entropy with the "
            "data labels, `loss` their alpha-weighted sum"
        )
    text += (
        ". Falling then flattening is convergence; held-out loss flat or rising while training loss keeps "
        "falling is overfitting (more data, or fewer steps)."
    )
    if "eval_agreement" in drawn:
        text += " Right: how often the student's next-token argmax matched the teacher's on held-out data."
    return text


def _quote(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "\u21b5") + "`" if text.strip() else "(empty)"


def render_summary(r: dict, out: Path) -> str:
    t, s = r["teacher"], r["student"]
    tk = r.get("tokenizers", {})
    if tk.get("differ"):
        w = 34
        rows = [
            ("parameters", f"{t['parameters']:,}", f"{s['parameters']:,}"),
            ("bits per byte", _f(t["bits_per_byte"]), _f(s["bits_per_byte"])),
            ("perplexity, own tokens", _f(t["perplexity"]), _f(s["perplexity"])),
            ("agreement (aligned positions)", "1", _f(s["top1_agreement"], ".3f")),
            ("KL(teacher||student), via map", "0", _f(s["kl_teacher_student"])),
            ("unaligned target tokens", "", f"{tk['unaligned_targets']:,} of {tk['student_targets']:,}"),
            ("forward tokens/s, own tokens", f"{t['tokens_per_second']:,.0f}", f"{s['tokens_per_second']:,.0f}"),
            ("FLOPs per byte", _big(t["flops_per_byte"]), _big(s["flops_per_byte"])),
            ("$ per 1M own tokens", _usd(t["usd_per_million_tokens"]), _usd(s["usd_per_million_tokens"])),
        ]
        head = ["", "distill eval: done (the tokenizers differ: compared per byte and at aligned positions)"]
    else:
        w = 26
        rows = [
            ("parameters", f"{t['parameters']:,}", f"{s['parameters']:,}"),
            ("perplexity", f"{t['perplexity']:.4g}", f"{s['perplexity']:.4g}"),
            ("agreement with teacher", "1", f"{s['top1_agreement']:.3f}"),
            ("KL(teacher||student)", "0", f"{s['kl_teacher_student']:.4g}"),
            ("forward tokens/s", f"{t['tokens_per_second']:,.0f}", f"{s['tokens_per_second']:,.0f}"),
            ("FLOPs per token", _big(t["flops_per_token"]), _big(s["flops_per_token"])),
            ("$ per 1M tokens", _usd(t["usd_per_million_tokens"]), _usd(s["usd_per_million_tokens"])),
        ]
        head = ["", "distill eval: done"]
    lines = [*head, f"  {'':<{w}}{'teacher':>14}{'student':>14}"]
    lines += [f"  {a:<{w}}{b:>14}{c:>14}" for a, b, c in rows]
    lines.append(f"  report: {out / 'eval_report.md'}")
    return "\n".join(lines)
