"""The `distill generate` job: the teacher answers a prompt file, and the answers become a dataset.

Sequence-level knowledge distillation (Kim & Rush 2016) trains the student with plain cross-entropy
on the teacher's *outputs* instead of matching its per-token distributions. It needs neither a
shared tokenizer nor the teacher in memory while the student trains: `distill generate` writes the
teacher's completions once, and `distill finetune` (or `distill train`) trains on them.

Output rows, one JSON object per line:

- plain prompts: ``{"id", "prompt", "completion", "finished"}``, the prompt/completion format of
  `distill.data` (loss on the completion only);
- with the chat template: ``{"id", "messages", "finished"}``, the conversation with the teacher's
  answer appended as the last assistant turn (loss on assistant turns only).

``finished`` is false where the answer hit ``max_new_tokens`` before the end-of-sequence token;
`distill.data` ends every completion with EOS, so filter those rows out if they must not teach an
early stop.

Interruption: rows are appended and flushed one at a time, keyed by a stable prompt ``id`` (the
prompt file's ``id`` column, else the row's position in it). A rerun with the same recipe keeps the
rows already written, drops a torn last line, and generates only the missing ones. Batches are fixed
slices of the prompt file and each is seeded with ``seed + batch index``, so even sampled rows are
the ones an uninterrupted run would have written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import set_seed

from distill.config import DTYPES
from distill.console import bar, quiet_libraries
from distill.data import load_rows
from distill.errors import UserError
from distill.models import load_model, load_tokenizer, resolve
from distill.recipe import load_recipe, parse

# Recipe keys that decide what a row contains: a resumed run must use the same values.
# (Not the prompt file's path or max_prompts: each row's prompt is checked itself, and a finished file
# may be extended with more prompts.)
ROW_SETTINGS = (
    "teacher_model_name_or_path", "chat_template", "max_new_tokens", "do_sample", "temperature", "top_p",
    "seed", "batch_size", "dtype", "attn_implementation",
)  # fmt: skip


@dataclass
class GenerateConfig:
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The model that writes the completions: a hub id, a local directory or a .gguf file."},
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompt file (.jsonl/.json/.csv/.parquet, a directory of them, or a hub dataset) with a "
            "`prompt` column, a `messages` column (a trailing assistant turn is dropped and regenerated), or "
            "a .txt file with one prompt per line. Other columns (e.g. a reference `completion`) are ignored; "
            "an `id` column, if present, keys the rows."
        },
    )
    output_file: str | None = field(
        default=None,
        metadata={"help": "Where the .jsonl dataset is written. Rerunning with the same recipe resumes it."},
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts; for quick runs."})
    chat_template: bool | None = field(
        default=None,
        metadata={
            "help": "Wrap each prompt as a user turn in the tokenizer's chat template. Unset: when the tokenizer "
            "has one. Set false for a base model that continues plain text."
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion, in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (true) or decode greedily (false)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with do_sample)."})
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "Nucleus sampling: keep the smallest set of tokens holding this much probability (with "
            "do_sample). Other settings (top_k, repetition penalty) come from the model's generation_config."
        },
    )
    seed: int = field(default=0, metadata={"help": "Batch b is sampled with seed + b, so reruns repeat exactly."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call (left-padded)."})
    dtype: str = field(
        default="auto", metadata={"help": "Dtype the model runs in: auto (as saved), float32, bfloat16, float16."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: sdpa, eager or flash_attention_2 (None: transformers' choice)."},
    )

    def __post_init__(self):
        for key in ("teacher_model_name_or_path", "prompts", "output_file"):
            if not getattr(self, key):
                raise UserError(f"{key} is required (see `distill generate --help_keys`)")
        if not self.output_file.endswith(".jsonl"):
            raise UserError(f"output_file must end in .jsonl (one row per line, for resuming), got {self.output_file}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UserError(f"max_prompts must be at least 1, got {self.max_prompts}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype={self.dtype!r} is not a dtype distill knows; use one of {', '.join(DTYPES)}")


ARGUMENTS = (GenerateConfig,)


# ---------------------------------------------------------------------------------------------------
# Prompts


def read_prompts(name: str, limit: int | None = None) -> list[dict]:
    """Rows ``{"id", "prompt"}`` where ``prompt`` is a string or a list of chat messages."""
    return prompts_from_rows(load_rows(name), name, limit)


def prompts_from_rows(rows, name: str, limit: int | None = None) -> list[dict]:
    columns = set(rows.column_names)
    column = next((c for c in ("messages", "prompt", "text") if c in columns), None)
    if column is None:
        raise UserError(
            f"{name} has columns {sorted(columns)}; prompts need a `prompt` column (text), a `messages` column "
            "(chat), or a .txt file with one prompt per line"
        )
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    ids = rows["id"] if "id" in columns else list(range(len(rows)))
    if len(set(ids)) != len(ids):
        raise UserError(
            f"{name}: the `id` column has duplicates; ids key the rows for resuming, so they must be unique"
        )
    prompts = []
    for i, value in zip(ids, rows[column]):
        if column == "messages":
            value = [{"role": m["role"], "content": m["content"]} for m in value]
            if value and value[-1]["role"] == "assistant":
                value = value[:-1]  # the reference answer; the teacher writes its own
            if not value:
                raise UserError(f"{name}: row {i} has no message before its assistant turn to answer")
        prompts.append({"id": i, "prompt": value})
    return prompts


def use_chat_template(setting: bool | None, tokenizer, prompts: list[dict]) -> bool:
    chat = bool(tokenizer.chat_template) if setting is None else setting
    if chat and not tokenizer.chat_template:
        raise UserError("chat_template: true, but the tokenizer has no chat template; set chat_template: false")
    if not chat and any(isinstance(p["prompt"], list) for p in prompts):
        raise UserError("the prompts are chat `messages`, which need the chat template; unset chat_template")
    return chat


def render(prompt, chat: bool, tokenizer) -> str:
    if not chat:
        return prompt
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------
# Generation


def eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos) if isinstance(eos, list) else {eos}


@torch.no_grad()
def complete(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    chat: bool = False,
) -> list[tuple[str, bool]]:
    """(completion, finished) for each rendered prompt, generated as one left-padded batch.

    Left padding puts every prompt's last token at the same position, so the new tokens of all rows
    line up after it. A chat rendering already holds the BOS token, so it is tokenized without
    special tokens; plain text gets them like training text does.
    """
    enc = tokenizer(texts, padding=True, padding_side="left", add_special_tokens=not chat, return_tensors="pt")
    enc = enc.to(model.device)
    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        pad_token_id=tokenizer.pad_token_id,
    )
    stop = eos_ids(model, tokenizer)
    width = enc["input_ids"].shape[1]
    results = []
    for prompt, mask, row in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), out[:, width:].tolist()):
        end = next((i for i, t in enumerate(row) if t in stop), None)
        new = row if end is None else row[:end]
        # Decoded after its prompt and cut off: decoding the new tokens alone would drop the space a
        # SentencePiece tokenizer puts before a first word ("\u2581Paris" -> "Paris").
        prompt = [t for t, m in zip(prompt, mask) if m]
        before = tokenizer.decode(prompt, skip_special_tokens=True)
        text = tokenizer.decode(prompt + new, skip_special_tokens=True)
        completion = text[len(before) :] if text.startswith(before) else tokenizer.decode(new, skip_special_tokens=True)
        results.append((completion, end is not None))
    return results


def make_row(prompt: dict, completion: str, finished: bool, chat: bool) -> dict:
    if chat:
        messages = (
            prompt["prompt"] if isinstance(prompt["prompt"], list) else [{"role": "user", "content": prompt["prompt"]}]
        )
        return {
            "id": prompt["id"],
            "messages": [*messages, {"role": "assistant", "content": completion}],
            "finished": finished,
        }
    return {"id": prompt["id"], "prompt": prompt["prompt"], "completion": completion, "finished": finished}


def _prompt_of(row: dict):
    return row["messages"][:-1] if "messages" in row else row["prompt"]


# ---------------------------------------------------------------------------------------------------
# Resuming


def read_done(path: Path) -> dict:
    """Rows already in ``path``, by id. A last line without its newline was torn by an interruption:
    it is cut off the file, and its prompt is generated again."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
        print(f"distill generate: dropped a torn last line of {path} (an interrupted write); it is redone")
    done = {}
    for n, line in enumerate(data[:end].splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {n} is not JSON ({err}); it was not written by distill generate") from err
        done[row["id"]] = row
    return done


def check_resumable(path: Path, settings: dict, done: dict, prompts: list[dict]) -> None:
    """Rows already written must come from these settings and these prompts, else the file would mix two runs."""
    sidecar = settings_file(path)
    if sidecar.exists():
        before = yaml.safe_load(sidecar.read_text(encoding="utf-8")) or {}
        changed = [k for k in ROW_SETTINGS if before.get(k) != settings.get(k)]
        if changed:
            what = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise UserError(
                f"{path} was started with other settings ({what}); finish it with the recipe it was started "
                "with, or write to a new output_file"
            )
    by_id = {p["id"]: p["prompt"] for p in prompts}
    for i, row in done.items():
        if i in by_id and _prompt_of(row) != by_id[i]:
            raise UserError(
                f"{path} holds a row with id {i!r} for another prompt than the prompt file's; the prompt file "
                "changed since the output was started: write to a new output_file"
            )


def settings_file(path: Path) -> Path:
    # Not .json, so that `dataset: <the output folder>` reads only the jsonl rows.
    return path.with_name(path.name + ".settings.yaml")


def run(recipe_path: str, overrides: list[str] | None = None) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    (config,) = parse(recipe, ARGUMENTS)
    quiet_libraries(config.prompts)
    resolve(config.teacher_model_name_or_path)
    prompts = read_prompts(config.prompts, config.max_prompts)
    tokenizer = load_tokenizer(config.teacher_model_name_or_path)
    chat = use_chat_template(config.chat_template, tokenizer, prompts)

    out = Path(config.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(config).items() if k in ROW_SETTINGS}
    done = read_done(out)
    check_resumable(out, settings, done, prompts)
    settings_file(out).write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    pending = [
        b
        for b in range(0, len(prompts), config.batch_size)
        if any(p["id"] not in done for p in prompts[b : b + config.batch_size])
    ]

    written = 0
    if pending:
        # device_map="auto" spreads a teacher too big for one GPU over all of them (and the CPU).
        placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
        model = load_model(config.teacher_model_name_or_path, config.dtype, config.attn_implementation, **placement)
        model.eval()
        progress = bar(
            total=len(prompts),
            initial=len(prompts) - sum(p["id"] not in done for p in prompts),
            unit="prompt",
            desc="generate",
        )
        with out.open("a", encoding="utf-8") as f:
            for start in pending:
                batch = prompts[start : start + config.batch_size]
                # Whole batches are redone, never parts of them, and seeded by position: a row's tokens
                # do not depend on where an earlier run was interrupted.
                set_seed(config.seed + start // config.batch_size)
                results = complete(
                    model, tokenizer, [render(p["prompt"], chat, tokenizer) for p in batch],
                    max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                    temperature=config.temperature, top_p=config.top_p, chat=chat,
                )  # fmt: skip
                for prompt, (completion, finished) in zip(batch, results):
                    if prompt["id"] in done:
                        continue
                    f.write(json.dumps(make_row(prompt, completion, finished, chat), ensure_ascii=False) + "\n")
                    f.flush()
                    written += 1
                    progress.update()
        progress.close()

    rows = read_done(out)
    unfinished = sum(not r["finished"] for r in rows.values())
    summary = {
        "output_file": str(out),
        "rows": len(rows),
        "written": written,
        "kept": len(rows) - written,
        "unfinished": unfinished,
    }
    print(
        f"\ndistill generate: {len(rows)} rows in {out} ({written} new, {len(rows) - written} kept from before); "
        f"{unfinished} hit max_new_tokens={config.max_new_tokens} before EOS"
    )
    return summary
