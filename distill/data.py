"""From a file or hub name to padded batches of (input_ids, attention_mask, labels).

Three row formats, read off the columns:
- ``messages``: chat turns, rendered with the tokenizer's chat template; loss on assistant tokens only.
- ``prompt`` + ``completion``: loss on the completion (and the EOS that ends it) only.
- ``text``: plain text, tokenized, joined with EOS and packed into blocks of ``max_length``; loss on all.

Labels are -100 wherever a token is not a target, which is the one mask every loss in
`distill.losses` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch

from distill import xtoken
from distill.chat import assistant_spans
from distill.config import DataArguments
from distill.errors import UserError
from distill.losses import IGNORE_INDEX
from distill.models import resolve

FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_rows(name: str, config: str | None = None, split: str = "train") -> datasets.Dataset:
    """A local file, a directory of same-type files, or a hub dataset name -> a `datasets.Dataset`."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(str(f) for f in path.iterdir() if f.suffix in FILE_TYPES)
        kinds = {FILE_TYPES[Path(f).suffix] for f in files}
        if len(kinds) != 1:
            raise UserError(
                f"{name} should hold data files of one type ({', '.join(FILE_TYPES)}); found {len(files)} "
                f"file(s) of types {sorted(kinds) or 'none'}"
            )
        return _load_files(kinds.pop(), files, name)
    if path.suffix in FILE_TYPES:
        if not path.is_file():
            raise UserError(f"data file not found: {name}")
        return _load_files(FILE_TYPES[path.suffix], [str(path)], name)
    if path.suffix or name.startswith((".", "/", "~")):
        raise UserError(f"data file not found or of an unknown type: {name} (known: {', '.join(FILE_TYPES)})")
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many kinds here (offline, missing split, bad config)
        raise UserError(
            f"could not load dataset {name!r} (split {split!r}): {type(err).__name__}: {err}. "
            "Give a local .jsonl/.json/.csv/.parquet/.txt file or directory, or a reachable hub dataset."
        ) from err


def _load_files(kind: str, files: list[str], name: str) -> datasets.Dataset:
    if all(Path(f).stat().st_size == 0 for f in files):
        raise UserError(f"{name} is empty: it has no rows to train or evaluate on")
    try:
        return datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as err:  # parse errors surface as several exception types
        raise UserError(f"could not read {name} as {kind}: {type(err).__name__}: {err}") from err


def detect_format(rows: datasets.Dataset, name: str = "dataset") -> str:
    columns = set(rows.column_names)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    if "prompt" in columns:
        return "prompt"
    raise UserError(
        f"{name} has columns {sorted(columns)}, none that distill can train on: give a `messages` column "
        "(chat), `prompt` and `completion` columns, a `text` column, or (on-policy only) a `prompt` column"
    )


def _with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids + [eos_id] if eos_id is not None and (not ids or ids[-1] != eos_id) else ids


def _pack_text(batch, tokenizer, max_length):
    # Packing across rows (not padding each) wastes no compute on padding; EOS marks the seams.
    stream: list[int] = []
    for text in batch["text"]:
        stream += _with_eos(tokenizer(text)["input_ids"], tokenizer.eos_token_id)
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    blocks = [b for b in blocks if len(b) >= 2]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def _prompt_completion(row, tokenizer, max_length):
    prompt = tokenizer(row["prompt"])["input_ids"]
    completion = _with_eos(tokenizer(row["completion"], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    return {"input_ids": ids, "labels": labels}


def _prompt_only(row, tokenizer, max_length):
    ids = tokenizer(row["prompt"])["input_ids"][:max_length]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)}


def _messages(row, tokenizer, max_length):
    text, spans = assistant_spans(row["messages"], tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [
        tok if any(start <= a < end for start, end in spans) else IGNORE_INDEX
        for tok, (a, _) in zip(ids, enc["offset_mapping"])
    ]
    return {"input_ids": ids, "labels": labels}


_TARGET_COLUMN = {"text": "text", "prompt_completion": "completion", "messages": "messages"}
_NO_TARGET_TEXT = {
    "text": "the text is empty",
    "prompt_completion": "the completion is empty",
    "messages": "no assistant turn has content",
}


def _has_target_text(value, fmt: str) -> bool:
    if fmt == "messages":
        return any(m.get("role") == "assistant" and str(m.get("content") or "").strip() for m in value or [])
    return bool(str(value or "").strip())


def check_has_targets(rows: datasets.Dataset, fmt: str, name: str) -> None:
    """Refuse data with nothing to learn: a row whose target text is empty keeps only the end-of-sequence
    token as a target, so a dataset of them trains, and exits 0, on nothing. Empty rows among good ones
    are kept (an empty answer teaches to stop, as a teacher that stopped at once did) but counted
    aloud, since they usually mean that a generation or a conversion went wrong."""
    column, empty = _TARGET_COLUMN[fmt], 0
    for batch in rows.select_columns([column]).iter(batch_size=1024):
        missing = sum(not _has_target_text(value, fmt) for value in batch[column])
        if fmt == "text" and missing < len(batch[column]):
            return  # packed text: an empty row only adds a seam, so one non-empty row settles it
        empty += missing
    if empty == len(rows):
        raise UserError(
            f"{name} has nothing to train on: in all {len(rows)} rows {_NO_TARGET_TEXT[fmt]}; fill in the "
            f"target text (check that the `{column}` column holds it)"
        )
    if empty:
        print(f"distill: {name}: in {empty} of {len(rows)} rows {_NO_TARGET_TEXT[fmt]}; they train only the end token")


def tokenize(
    rows: datasets.Dataset,
    tokenizer,
    max_length: int,
    name: str = "dataset",
    prompts_only: bool = False,
    teacher_tokenizer=None,
    teacher_max_length: int | None = None,
) -> datasets.Dataset:
    """Token ids and labels (-100: not a target) of every row. ``prompts_only``: a `prompt`-only
    dataset is accepted, its rows all prompt and no target (fully on-policy training samples every
    completion); elsewhere it is refused, having nothing to train or evaluate on.

    ``teacher_tokenizer``: a teacher with another tokenizer; each row also gets ``teacher_input_ids``
    and ``alignment`` (`tokenize_pair`), and ``text`` rows are one document each, not packed."""
    fmt = detect_format(rows, name)
    if len(rows) == 0:
        raise UserError(f"{name} is empty: it has no rows to train or evaluate on")
    if fmt == "prompt":
        if not prompts_only:
            raise UserError(
                f"{name} has a `prompt` column but no `completion`: only fully on-policy training (lmbda: 1) can "
                "use prompts alone, since the student writes every completion. Add a `completion` column (or use "
                "`messages`), or set lmbda: 1. Held-out data always needs completions (the loss is measured on them): give eval_dataset "
                "with completions, or set eval_fraction: 0"
            )
        out = rows.map(
            _prompt_only, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
            remove_columns=rows.column_names, desc=f"Tokenizing {name}",
        )  # fmt: skip
        out = out.filter(lambda row: len(row["input_ids"]) > 0, desc="Dropping empty prompts")
        if len(out) == 0:
            raise UserError(f"{name} has no prompt with any token")
        return out
    if fmt == "messages" and not tokenizer.chat_template:
        raise UserError(f"{name} is chat data (`messages`) but the tokenizer has no chat template")
    check_has_targets(rows, fmt, name)
    if teacher_tokenizer is not None:
        if fmt == "messages" and not teacher_tokenizer.chat_template:
            raise UserError(
                f"{name} is chat data (`messages`) but the teacher's tokenizer has no chat template; cross-tokenizer "
                "distillation renders each side with its own template (give the teacher its instruct tokenizer)"
            )
        kw = {"tokenizer": tokenizer, "teacher_tokenizer": teacher_tokenizer, "max_length": max_length}
        out = rows.map(
            tokenize_pair, fn_kwargs=kw | {"teacher_max_length": teacher_max_length},
            remove_columns=rows.column_names, desc=f"Tokenizing {name} for both tokenizers",
        )  # fmt: skip
    elif fmt == "text":
        out = rows.map(
            _pack_text, batched=True, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
            remove_columns=rows.column_names, desc=f"Tokenizing and packing {name}",
        )  # fmt: skip
    else:
        fn = _messages if fmt == "messages" else _prompt_completion
        out = rows.map(
            fn, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
            remove_columns=rows.column_names, desc=f"Tokenizing {name}",
        )  # fmt: skip
    # A row whose targets were all truncated away would add only padding to a batch.
    out = out.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"][1:]), desc="Dropping targetless rows")
    if len(out) == 0:
        raise UserError(f"{name} has no target tokens after tokenization (check max_length and the columns)")
    return out


def build_datasets(
    args: DataArguments,
    tokenizer,
    seed: int = 0,
    prompts_only: bool = False,
    teacher_tokenizer=None,
    teacher_max_length: int | None = None,
):
    """(train, eval or None), tokenized. The held-out split is cut from raw rows, before packing,
    so no text is shared between the two. ``prompts_only``: the training data may be prompts alone
    (see `tokenize`). ``teacher_tokenizer``: a teacher with another tokenizer (see `tokenize`)."""
    train_rows, eval_rows = split_rows(args, seed)
    pair = {"teacher_tokenizer": teacher_tokenizer, "teacher_max_length": teacher_max_length}
    train = tokenize(train_rows, tokenizer, args.max_length, f"dataset {args.dataset}", prompts_only, **pair)
    evaluation = None
    if eval_rows is not None:
        name = f"eval data {args.eval_dataset or args.dataset}"
        evaluation = tokenize(eval_rows, tokenizer, args.max_length, name, **pair)
    return train, evaluation


def split_rows(args: DataArguments, seed: int = 0):
    """(train, eval or None) raw rows, as `build_datasets` tokenizes them."""
    train_rows = load_rows(args.dataset, args.dataset_config, args.dataset_split)
    if args.max_train_samples is not None:
        train_rows = train_rows.select(range(min(args.max_train_samples, len(train_rows))))
    eval_rows = None
    if args.eval_dataset:
        eval_rows = load_rows(args.eval_dataset, args.dataset_config, args.eval_split)
    elif args.eval_fraction > 0 and len(train_rows) >= 2:
        split = train_rows.train_test_split(test_size=args.eval_fraction, seed=seed)
        train_rows, eval_rows = split["train"], split["test"]
    if eval_rows is not None and args.max_eval_samples is not None:
        eval_rows = eval_rows.select(range(min(args.max_eval_samples, len(eval_rows))))
    return train_rows, eval_rows


def teacher_length(teacher: str, max_length: int) -> int:
    """Where the side of a row of ``teacher`` (a hub id, folder or .gguf) is cut when the student's is cut
    at ``max_length``: its tokenizer may need more tokens for the same text (twice as many), within its
    positions. Cut positions are counted as unaligned."""
    limit = None
    where, gguf_file = resolve(teacher)
    if not gguf_file and Path(where).is_dir():
        limit = json.loads((Path(where) / "config.json").read_text()).get("max_position_embeddings")
    return min(2 * max_length, limit) if isinstance(limit, int) else 2 * max_length


def tokenize_pair(
    row: dict, tokenizer, teacher_tokenizer, max_length: int, teacher_max_length: int | None = None
) -> dict[str, list[int]]:
    """One row for a teacher with another tokenizer: the student's ``input_ids`` and ``labels`` as
    `tokenize` makes them (one document per row: ``text`` is not packed, since packing differs per
    tokenizer), the teacher's ``teacher_input_ids`` (chat: rendered with the teacher's own template),
    and ``alignment``: per student position, the teacher position predicting from the same byte of the
    visible text, or -1 (`distill.xtoken`). Both sides are truncated, the teacher at
    ``teacher_max_length`` (default ``max_length``); a student position whose teacher position was cut
    off is -1 too, and counted by `xtoken.unaligned_targets` like any other."""
    student, teacher = xtoken.encode(tokenizer, row, "student"), xtoken.encode(teacher_tokenizer, row, "teacher")
    return pair_of(student, teacher, max_length, teacher_max_length)


def pair_of(student, teacher, max_length: int, teacher_max_length: int | None = None) -> dict[str, list[int]]:
    """`tokenize_pair`'s row from the two sides' encodings (`xtoken.encode`)."""
    n_t = teacher_max_length or max_length
    alignment = [j if j < n_t else -1 for j in xtoken.align(student, teacher)][:max_length]
    labels = [t if target else IGNORE_INDEX for t, target in zip(student.ids, student.target)][:max_length]
    return {
        "input_ids": student.ids[:max_length],
        "labels": labels,
        "teacher_input_ids": teacher.ids[:n_t],
        "alignment": alignment,
    }


def unaligned_share(rows: datasets.Dataset) -> tuple[int, int]:
    """(target tokens with no teacher position, target tokens) of rows made by `tokenize_pair`."""
    unaligned = targets = 0
    for batch in rows.select_columns(["alignment", "labels"]).iter(batch_size=1024):
        for alignment, labels in zip(batch["alignment"], batch["labels"]):
            unaligned += xtoken.unaligned_targets(alignment, labels)
            targets += sum(y != IGNORE_INDEX for y in labels[1:])
    return unaligned, targets


class Collator:
    """Right-pads a list of tokenized rows into tensors; labels pad with -100.

    Lengths are rounded up to a multiple of ``pad_to_multiple_of`` so that variable-length data
    produces few distinct batch shapes (tensor-core friendly, and the cost meter counts FLOPs once
    per shape). Rows of a teacher with another tokenizer (`tokenize_pair`) also give
    ``teacher_input_ids`` (padded with ``teacher_pad_token_id``), ``teacher_attention_mask`` and
    ``alignment`` (padded with -1: no teacher position).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8, teacher_pad_token_id: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.teacher_pad_token_id = teacher_pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "teacher_input_ids" in rows[0]:
            batch |= self._teacher_side(rows, width)
        return batch

    def _teacher_side(self, rows: list[dict], width: int) -> dict[str, torch.Tensor]:
        if self.teacher_pad_token_id is None:
            raise ValueError("rows with teacher_input_ids need Collator(teacher_pad_token_id=...)")
        longest = max(len(r["teacher_input_ids"]) for r in rows)
        t_width = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(rows), t_width), self.teacher_pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t_width), dtype=torch.long)
        alignment = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["teacher_input_ids"])
            ids[i, :n] = torch.tensor(r["teacher_input_ids"])
            mask[i, :n] = 1
            alignment[i, : len(r["alignment"])] = torch.tensor(r["alignment"])
        return {"teacher_input_ids": ids, "teacher_attention_mask": mask, "alignment": alignment}


# Several teachers (`teachers:`): each teacher's columns and batch keys are named ``name@i``; teacher i's
# source reads them under their plain names, so a source is the same alone or among several.


def keyed(name: str, index: int | None) -> str:
    """Teacher ``index``'s name for a row's or batch's key (the plain name for a single teacher)."""
    return name if index is None else f"{name}@{index}"


def own_keys(d: dict, index: int | None) -> dict:
    """Teacher ``index``'s view of a row or batch: its own keys (``name@index``) under their plain
    names and the shared keys (the student's), no other teacher's."""
    if index is None:
        return d
    out = {}
    for key, value in d.items():
        name, at, i = key.partition("@")
        if not at:
            out.setdefault(key, value)
        elif i == str(index):
            out[name] = value
    return out


class TeachersCollator:
    """Collates rows for several teachers: the student's side once (``collator``), then each teacher's
    own keys from its collator (``per_teacher[i]``, which sees the rows as `own_keys` gives them),
    renamed ``name@i``."""

    def __init__(self, collator, per_teacher: list):
        self.collator, self.per_teacher = collator, per_teacher

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collator([own_keys(r, -1) for r in rows])
        for i, collate in enumerate(self.per_teacher):
            part = collate([own_keys(r, i) for r in rows])
            batch |= {keyed(k, i): v for k, v in part.items() if k not in batch}
        return batch
