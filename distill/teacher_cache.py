"""An offline teacher: run it once over the data, keep its top-k targets on disk, train without it.

``distill cache-teacher RECIPE.yaml`` tokenizes the recipe's data exactly as ``distill train`` will,
runs the teacher over every example and stores, for every target position, the teacher's k most
likely ids, their log-probabilities at the recipe's temperature and the log of the remaining mass
(:class:`distill.losses.TopKTargets`). ``distill train`` with ``teacher_cache: PATH`` then loads
no teacher model: each batch carries its targets, and the loss is the top-k loss
(:func:`distill.losses.topk_distillation_loss` or its chunked twin).

Layout::

    PATH/manifest.json          what the cache was built for, progress, and the build's report
    PATH/train/shard-00000/     logprobs.npy (rows, k) float32, ids.npy (rows, k) int32,
                                tail.npy (rows,) float32, offsets.npy (examples + 1,) int64,
                                cost.json (the teacher FLOPs and seconds that made the shard)
    PATH/train/shard-00001/ ...
    PATH/eval/shard-00000/ ...  when the recipe has evaluation data

A *row* is a target position: position p of an example with ``labels[p + 1] != -100``, in order;
example e of a shard owns rows ``offsets[e]:offsets[e + 1]``. Only target positions are stored:
prompts and padding cost no disk.

A shard is written into ``shard-NNNNN.tmp`` and renamed when complete, so an interrupted build
leaves only whole shards plus at most one ``.tmp`` directory, which is never read and is redone on
the next run: building again resumes. Shards hold whole examples in fixed batches, so a resumed
build writes the same bytes as an uninterrupted one.

A cache serves one run: its manifest records the tokenizer (a hash of its vocabulary), the data (a
hash of every example's token ids and labels), ``max_length``, k, the temperature, the teacher and
the vocabulary size. Training refuses a cache that differs in any of them, before loading a model.
The teacher is identified by what it is, not by where it is: a hash of its config and weight files
(:func:`distill.models.local_model_digest`) and the dtype it ran in. A teacher that is not on the
training machine cannot be checked, and is trusted with a note.
The temperature is part of it because top-k log-probabilities at one temperature cannot be
re-tempered: the tail's mass at another T depends on the logits that were dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from distill.chunked import (
    chunked_distillation_loss,
    chunked_topk_distillation_loss,
    final_hidden_states,
    output_weight,
    supports_chunked_loss,
)
from distill.errors import UserError
from distill.flops import FlopMeter
from distill.losses import IGNORE_INDEX, TopKTargets, distillation_loss, teacher_topk, topk_distillation_loss
from distill.models import local_model_digest
from distill.teacher_server import TeacherServer, check_run

FORMAT = 2  # 2: the teacher is identified by its files and dtype (teacher_fingerprint), + teacher_cost
MANIFEST = "manifest.json"
SHARD_EXAMPLES = 1024  # examples per shard: a few to a few hundred MB at k = 64
REPORT_BATCHES = 4  # batches on which the build compares the top-k loss with the full one
ARRAYS = {"logprobs": np.float32, "ids": np.int32, "tail": np.float32}
_IDENTITY_NAMES = {
    "tokenizer": "tokenizer",
    "datasets": "data (the hash of its token ids and labels)",
    "max_length": "max_length",
    "k": "teacher_top_k",
    "temperature": "temperature",
}


def data_fingerprint(data) -> str | None:
    """sha256 of every example's ``input_ids`` and ``labels``, in order (None for no data)."""
    if data is None:
        return None
    digest = hashlib.sha256()
    for batch in data.with_format("arrow").iter(batch_size=1024):
        for column in ("input_ids", "labels"):
            array = batch.column(column).combine_chunks()
            digest.update(np.asarray(array.offsets).astype(np.int64).tobytes())
            digest.update(np.asarray(array.values).astype(np.int64).tobytes())
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def run_identity(config, data_args, tokenizer, train_data, eval_data) -> dict:
    """What a cache must have been built for to serve this run."""
    return {
        "tokenizer": tokenizer_hash(tokenizer),
        "datasets": {"train": data_fingerprint(train_data), "eval": data_fingerprint(eval_data)},
        "max_length": data_args.max_length,
        "k": config.teacher_top_k,
        "temperature": config.temperature,
    }


def _mismatch(cached: dict, wanted: dict) -> list[str]:
    return [
        f"{_IDENTITY_NAMES[key]} (cache: {_short(cached.get(key))}, this run: {_short(wanted[key])})"
        for key in _IDENTITY_NAMES
        if cached.get(key) != wanted[key]
    ]


def _teacher_mismatch(cached: dict, wanted: dict, cached_name: str | None, wanted_name: str | None) -> list[str]:
    problems = []
    # A cache filled from a server does not know the dtype the server ran in (None): not checked.
    if cached["dtype"] is None:
        wanted = {**wanted, "dtype": None}
    if cached["files"] != wanted["files"]:
        problems.append(
            f"the teacher's weights or config (cache: {_short(cached['files'])} from {cached_name}, "
            f"this run: {_short(wanted['files'])} from {wanted_name})"
        )
    if cached["dtype"] != wanted["dtype"]:
        problems.append(
            f"teacher_dtype (cache: {cached['dtype']}, this run: {wanted['dtype']}; "
            f"set teacher_dtype: {cached['dtype']} to use this cache)"
        )
    return problems


def _short(value):
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return value[:12] if isinstance(value, str) and len(value) == 64 else value


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: a reader sees the old manifest or the new one, never half


# --- reading ---------------------------------------------------------------------------------------


class TeacherCache:
    """A finished cache directory: its manifest, checks against a run, and its splits."""

    def __init__(self, path: str):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise UserError(
                f"teacher_cache {path} holds no {MANIFEST}: build it first with `distill cache-teacher RECIPE.yaml` "
                "(the same recipe, with teacher_model_name_or_path set)"
            )
        self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT:
            raise UserError(
                f"teacher_cache {path} was written by another version of distill (format "
                f"{self.manifest.get('format')}, this one reads {FORMAT}): delete it and build it again with "
                "`distill cache-teacher RECIPE.yaml`"
            )
        if not self.manifest.get("complete"):
            raise UserError(
                f"teacher_cache {path} is incomplete (its build was interrupted); run `distill cache-teacher` "
                "with the same recipe again to finish it"
            )
        self.vocab_size = self.manifest["vocab_size"]
        self.k = self.manifest["identity"]["k"]

    def check(self, identity: dict) -> None:
        """UserError unless the cache was built for a run with this identity."""
        self._refuse(_mismatch(self.manifest["identity"], identity))

    def check_teacher(self, teacher: str | None, dtype: str) -> str | None:
        """UserError if ``teacher`` is a model on this machine other than the one the cache was built
        from, or ``dtype`` is not the one it ran in. When it cannot be checked (no teacher named, not
        on this machine, or a hub teacher at build time), the line to print saying so."""
        built = self.manifest["teacher_fingerprint"]
        digest = local_model_digest(teacher) if teacher else None
        if digest is None or built["files"] is None:
            why = (
                "the recipe names none" if not teacher
                else f"{teacher} is not a model on this machine" if digest is None
                else f"it was built from {self.manifest['teacher']}, not a local model"
            )  # fmt: skip
            return f"distill: teacher_cache {self.path}: the teacher could not be checked ({why}); using its targets"
        self._refuse(_teacher_mismatch(built, {"files": digest, "dtype": dtype}, self.manifest["teacher"], teacher))
        return None

    def _refuse(self, problems: list[str]) -> None:
        if problems:
            raise UserError(
                f"teacher_cache {self.path} was built for another run; it differs in: {'; '.join(problems)}. "
                "Rebuild it with `distill cache-teacher` on this recipe, or restore the recipe it was built with."
            )

    def check_student(self, student) -> None:
        """The cache's ids span min(student vocab, teacher vocab); so must this student's logits."""
        width = student.get_output_embeddings().weight.shape[0]
        if min(width, self.manifest["teacher_vocab_size"]) != self.vocab_size:
            raise UserError(
                f"teacher_cache {self.path} was built for a shared vocabulary of {self.vocab_size} ids, but this "
                f"student has {width} output logits; rebuild the cache with this student in the recipe"
            )

    def split(self, name: str) -> CacheSplit:
        return CacheSplit(
            self.path / name, self.manifest["splits"][name]["examples"], self.manifest["examples_per_shard"]
        )

    def attach(self, name: str, data):
        """``data`` (a tokenized dataset of this run) whose rows carry their cached targets."""
        return None if data is None else WithTeacherTargets(data, self.split(name))


class CacheSplit:
    """The targets of one split, memory-mapped shard by shard."""

    def __init__(self, path: Path, examples: int, examples_per_shard: int):
        self.path, self.examples, self.per_shard = path, examples, examples_per_shard
        self._shards: dict[int, dict] = {}

    def __getstate__(self):
        # DataLoader workers started by spawn get a pickled copy: reopen the maps there rather than
        # pickling their contents.
        return {**self.__dict__, "_shards": {}}

    def _shard(self, index: int) -> dict:
        if index not in self._shards:
            where = self.path / f"shard-{index:05d}"
            self._shards[index] = {name: np.load(where / f"{name}.npy", mmap_mode="r") for name in (*ARRAYS, "offsets")}
        return self._shards[index]

    def example(self, i: int) -> TopKTargets:
        """Targets of example ``i``'s target positions, in order, as numpy arrays."""
        if not 0 <= i < self.examples:
            raise IndexError(i)
        shard = self._shard(i // self.per_shard)
        lo, hi = shard["offsets"][i % self.per_shard : i % self.per_shard + 2]
        return TopKTargets(*(shard[name][lo:hi] for name in ARRAYS))


class WithTeacherTargets(torch.utils.data.Dataset):
    """A tokenized dataset whose rows also carry ``teacher_targets`` from a :class:`CacheSplit`."""

    def __init__(self, data, split: CacheSplit):
        if len(data) != split.examples:
            raise ValueError(f"the cache holds {split.examples} examples but the data has {len(data)}")
        self.data, self.split = data, split

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "teacher_targets": self.split.example(i)}


class TargetsCollator:
    """Wraps a collator: adds ``teacher_logprobs`` / ``teacher_ids`` (batch, seq, k) and
    ``teacher_tail`` (batch, seq), aligned with the logits (position p holds the targets for label
    p + 1). Positions without a target hold zeros, which the losses never read."""

    def __init__(self, collator, k: int):
        self.collator, self.k = collator, k

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collator(rows)
        labels = batch["labels"]
        b, width = labels.shape
        logprobs = torch.zeros(b, width, self.k)
        ids = torch.zeros(b, width, self.k, dtype=torch.int32)
        tail = torch.zeros(b, width)
        for j, row in enumerate(rows):
            positions = labels[j, 1:].ne(IGNORE_INDEX).nonzero().squeeze(1)
            cached = row["teacher_targets"]
            if len(positions) != len(cached.tail):
                raise ValueError(
                    f"an example has {len(positions)} target positions but its cached targets have "
                    f"{len(cached.tail)} rows: the cache does not belong to this data"
                )
            logprobs[j, positions] = torch.from_numpy(np.array(cached.logprobs))
            ids[j, positions] = torch.from_numpy(np.array(cached.ids))
            tail[j, positions] = torch.from_numpy(np.array(cached.tail))
        return {**batch, "teacher_logprobs": logprobs, "teacher_ids": ids, "teacher_tail": tail}


# --- building --------------------------------------------------------------------------------------


def _final_hidden(model, inputs: dict) -> torch.Tensor:
    with final_hidden_states(model) as captured:
        model(**inputs, logits_to_keep=1)
    return captured["hidden"]


@torch.no_grad()
def teacher_targets(
    teacher, batch: dict, k: int, temperature: float, vocab: int, chunk: int = 1024, meter: FlopMeter | None = None
) -> TopKTargets:
    """Top-k targets of every target position of a batch, in row-major order, as fp32 tensors.

    From the final hidden states a chunk of rows at a time where the teacher allows it (the full
    logits of a batch are never made), else from its logits. ``meter`` counts the teacher's FLOPs.
    """
    measure = meter.measure if meter is not None else lambda *args, **kwargs: contextlib.nullcontext()
    target = batch["labels"][:, 1:].ne(IGNORE_INDEX)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with measure("teacher", inputs):
        if supports_chunked_loss(teacher):
            rows, weight = _final_hidden(teacher, inputs)[:, :-1][target], output_weight(teacher)[:vocab]
            logits = (rows[i : i + chunk] @ weight.T for i in range(0, len(rows), chunk))
            # The output layer runs on target rows only: its FLOPs are per row, not per batch shape.
            with measure("teacher", {}, "output layer", units=len(rows)):
                parts = [teacher_topk(x, k, temperature) for x in logits]
        else:
            full = teacher(**inputs).logits[:, :-1][target][:, :vocab]
            parts = [teacher_topk(full[i : i + chunk], k, temperature) for i in range(0, len(full), chunk)]
    if not parts:
        return TopKTargets(torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long), torch.zeros(0))
    return TopKTargets(*(torch.cat(p) for p in zip(*parts)))


def _write_shard(final: Path, arrays: dict, cost: dict) -> None:
    """Write into final.tmp, then rename: a shard directory that exists is complete. Its cost goes
    with it, so that a resumed build still counts the teacher work of the shards it kept."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array)
    (tmp / "cost.json").write_text(json.dumps(cost) + "\n", encoding="utf-8")
    os.replace(tmp, final)


def served_targets(server: TeacherServer, size, batches: list[dict]):
    """Top-k targets of every target position of each batch, row-major, from a teacher server, with
    the FLOPs the server did (computed from the teacher's config, as the trainer bills them). All the
    batches are sent at once: the server works on the next while the answers of one are unpacked."""
    for request, batch in [(server.submit(batch), batch) for batch in batches]:
        scored = request.result()
        target = batch["labels"][:, 1:].ne(IGNORE_INDEX)
        rows = TopKTargets(*(t[:, :-1][target] for t in scored.targets))
        yield rows, scored.flops(size)


def write_split(directory: Path, data, teacher, collator, *, k, temperature, vocab, batch_size, per_shard, progress):
    """Cache ``data``'s targets under ``directory``, skipping shards that are already complete.
    ``teacher``: the model, or a (TeacherServer, its ModelSize) pair."""
    served = isinstance(teacher, tuple)
    device = "cpu" if served else next(teacher.parameters()).device
    meter = FlopMeter()  # one for the split: each batch shape is counted once, not once per shard
    for index in range(math.ceil(len(data) / per_shard)):
        final = directory / f"shard-{index:05d}"
        first, last = index * per_shard, min(len(data), (index + 1) * per_shard)
        if final.is_dir():
            progress.update(last - first)
            continue
        arrays = {name: [] for name in ARRAYS}
        counts = []
        started, flops_before, computed = time.perf_counter(), meter.flops.get("teacher", 0), 0
        batches = [
            {
                key: value.to(device)
                for key, value in collator([data[i] for i in range(s, min(last, s + batch_size))]).items()
            }
            for s in range(first, last, batch_size)
        ]
        if served:
            results = served_targets(*teacher, batches)
        else:
            results = ((teacher_targets(teacher, batch, k, temperature, vocab, meter=meter), 0) for batch in batches)
        for batch, (targets, flops) in zip(batches, results, strict=True):
            for name, dtype in ARRAYS.items():
                arrays[name].append(getattr(targets, name).cpu().numpy().astype(dtype))
            counts += batch["labels"][:, 1:].ne(IGNORE_INDEX).sum(1).tolist()
            computed += flops
            progress.update(len(batch["labels"]))
        out = {name: np.concatenate(parts) for name, parts in arrays.items()}
        out["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        cost = {"flops": computed if served else meter.flops.get("teacher", 0) - flops_before,
                "examples": last - first}  # fmt: skip
        _write_shard(final, out, {**cost, "seconds": time.perf_counter() - started})


def _split_rows(directory: Path) -> tuple[int, int, float]:
    """(rows, bytes on disk, mean teacher tail mass) of a finished split."""
    rows = size = 0
    tail_mass = 0.0
    for shard in sorted(directory.glob("shard-?????")):
        tail = np.load(shard / "tail.npy")
        rows += len(tail)
        tail_mass += float(np.exp(tail.astype(np.float64)).sum())
        size += sum(f.stat().st_size for f in shard.glob("*.npy"))
    return rows, size, tail_mass / max(rows, 1)


def _split_cost(directory: Path) -> dict:
    """The teacher's work for a finished split: FLOPs, examples and wall seconds, over all its shards."""
    total = {"flops": 0, "examples": 0, "seconds": 0.0}
    for shard in sorted(directory.glob("shard-?????")):
        cost = json.loads((shard / "cost.json").read_text(encoding="utf-8"))
        total = {key: total[key] + cost[key] for key in total}
    return total


@torch.no_grad()
def loss_error(student, teacher, data, split: CacheSplit, collator, config, vocab: int, batch_size: int) -> dict:
    """KD and total loss of ``student`` over the first batches of ``data``, with the full teacher and
    with the cached top-k targets read back from disk (which also checks the round trip)."""
    device = next(teacher.parameters()).device
    kw = {"alpha": config.alpha, "temperature": config.temperature, "loss_type": config.loss_type, "beta": config.beta}
    sums = torch.zeros(5, dtype=torch.float64)  # tokens, then token-weighted kd/loss, full and top-k
    for start in range(0, min(len(data), REPORT_BATCHES * batch_size), batch_size):
        rows = [
            {**data[i], "teacher_targets": split.example(i)} for i in range(start, min(len(data), start + batch_size))
        ]
        batch = {key: value.to(device) for key, value in collator(rows).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"]
        targets = TopKTargets(batch["teacher_logprobs"], batch["teacher_ids"], batch["teacher_tail"])
        if supports_chunked_loss(student) and supports_chunked_loss(teacher):  # no logits-sized tensors
            h_s, h_t = (_final_hidden(model, inputs) for model in (student, teacher))
            w_s, w_t = output_weight(student), output_weight(teacher)
            full = chunked_distillation_loss(h_s, w_s, h_t, w_t, labels, **kw)
            topk = chunked_topk_distillation_loss(h_s, w_s, targets, labels, vocab_size=vocab, **kw)
        else:
            s = student(**inputs).logits.float()
            full = distillation_loss(s[..., :vocab], teacher(**inputs).logits.float()[..., :vocab], labels, **kw)
            topk = topk_distillation_loss(s, targets, labels, vocab_size=vocab, **kw)
        n = full.num_tokens.item()
        sums += torch.tensor([n, full.kd.item() * n, full.loss.item() * n, topk.kd.item() * n, topk.loss.item() * n])
    kd_full, loss_full, kd_topk, loss_topk = (sums[1:] / sums[0].clamp(min=1)).tolist()
    return {
        "tokens": int(sums[0]),
        "kd_full": kd_full,
        "kd_topk": kd_topk,
        "kd_rel_error": abs(kd_topk - kd_full) / max(abs(kd_full), 1e-12),
        "loss_full": loss_full,
        "loss_topk": loss_topk,
        "loss_rel_error": abs(loss_topk - loss_full) / max(abs(loss_full), 1e-12),
    }


def build(
    recipe_path: str, overrides: list[str] | None = None, examples_per_shard: int = SHARD_EXAMPLES
) -> tuple[dict, str]:
    """``distill cache-teacher``: build (or finish) the cache the recipe's ``teacher_cache`` names.

    Returns (the final manifest, the cache's path). Everything a user can get wrong is checked
    before a model loads.
    """
    from tqdm.auto import tqdm

    from distill.config import TRAIN_ARGUMENTS
    from distill.data import Collator, build_datasets
    from distill.models import (
        check_max_length,
        check_same_tokenizer,
        load_model,
        load_tokenizer,
        resolve,
        vocab_sizes_fit,
    )
    from distill.recipe import load_recipe, parse

    model_args, data_args, config = parse(load_recipe(recipe_path, overrides), TRAIN_ARGUMENTS)
    if not config.teacher_cache:
        raise UserError("set teacher_cache: PATH in the recipe (or --teacher_cache PATH): where to write the cache")
    if not config.teacher_model_name_or_path:
        raise UserError("cache-teacher runs the teacher: set teacher_model_name_or_path in the recipe")
    server = None
    if config.teacher_server:
        server = TeacherServer.of_recipe(config)
    roles = (("student", model_args.model_name_or_path),) + (
        () if server else (("teacher", config.teacher_model_name_or_path),)
    )
    for role, name in roles:
        resolve(name)
        check_max_length(name, data_args.max_length, role)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    if server is not None:
        teacher_size = check_run(server, config, data_args, model_args, tokenizer)
    else:
        check_same_tokenizer(tokenizer, load_tokenizer(config.teacher_model_name_or_path))
    with config.main_process_first(desc="tokenizing"):
        train_data, eval_data = build_datasets(data_args, tokenizer, seed=config.seed)
    splits = {name: d for name, d in (("train", train_data), ("eval", eval_data)) if d is not None}
    identity = run_identity(config, data_args, tokenizer, train_data, eval_data)
    teacher_fingerprint = {
        "files": local_model_digest(config.teacher_model_name_or_path),  # None for a hub id
        "dtype": None if server else config.resolved_teacher_dtype,  # a server's is not known here
    }

    path = Path(config.teacher_cache)
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("format") != FORMAT:
            raise UserError(
                f"{path} holds a teacher cache written by another version of distill (format {old.get('format')}, "
                f"this one writes {FORMAT}): delete it, or choose another teacher_cache path"
            )
        problems = _mismatch(old["identity"], identity) + _teacher_mismatch(
            old["teacher_fingerprint"], teacher_fingerprint, old["teacher"], config.teacher_model_name_or_path
        )
        if old["examples_per_shard"] != examples_per_shard:
            problems.append(
                f"examples per shard (cache: {old['examples_per_shard']}, this build: {examples_per_shard})"
            )
        if problems:
            raise UserError(
                f"{path} already holds a teacher cache of another run; it differs in: {'; '.join(problems)}. "
                "Delete it or choose another teacher_cache path."
            )
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"teacher_cache {path} exists and is not a teacher cache: choose a new or empty directory")

    student = load_model(model_args.model_name_or_path, model_args.dtype, model_args.attn_implementation)
    if server is None:
        teacher = load_model(
            config.teacher_model_name_or_path, config.resolved_teacher_dtype, model_args.attn_implementation
        )
        vocab_sizes_fit(tokenizer, student, teacher)
        teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
        vocab = min(student.get_output_embeddings().weight.shape[0], teacher_vocab)
        teacher.to(config.device).eval()
    else:
        vocab_sizes_fit(tokenizer, student)
        teacher, teacher_vocab, vocab = (server, teacher_size), server.teacher_vocab, server.vocab
    student.to(config.device).eval()

    manifest = {
        "format": FORMAT,
        "identity": identity,
        "teacher": config.teacher_model_name_or_path,
        "teacher_fingerprint": teacher_fingerprint,
        "teacher_server": config.teacher_server,  # None: the teacher ran here
        "teacher_vocab_size": teacher_vocab,
        "vocab_size": vocab,
        "examples_per_shard": examples_per_shard,
        "dtypes": {name: np.dtype(dtype).name for name, dtype in ARRAYS.items()},
        "splits": {name: {"examples": len(d)} for name, d in splits.items()},
        "complete": False,
    }
    path.mkdir(parents=True, exist_ok=True)
    _write_json(manifest_path, manifest)
    collator = Collator(tokenizer.pad_token_id)
    batch_size = config.per_device_eval_batch_size
    with tqdm(total=sum(len(d) for d in splits.values()), desc="cache-teacher", unit="example") as progress:
        for name, data in splits.items():
            write_split(
                path / name, data, teacher, collator, k=config.teacher_top_k, temperature=config.temperature,
                vocab=vocab, batch_size=batch_size, per_shard=examples_per_shard, progress=progress,
            )  # fmt: skip

    rows = size = 0
    for name in splits:
        split_rows, split_size, tail_mass = _split_rows(path / name)
        manifest["splits"][name].update(rows=split_rows, bytes=split_size, mean_tail_mass=tail_mass)
        rows, size = rows + split_rows, size + split_size
    manifest["bytes_per_token"] = size / max(rows, 1)
    # What running the teacher cost, per split, for the training run to bill as its teacher's share.
    manifest["teacher_cost"] = {name: {**_split_cost(path / name), "measured": server is None} for name in splits}
    cache = TeacherCache.__new__(TeacherCache)  # the reader, on the manifest not yet marked complete
    cache.path, cache.manifest = path, manifest
    # The top-k loss against the full teacher's needs the full teacher: not with a server.
    manifest["report"] = None if server else loss_error(
        student, teacher, train_data, cache.split("train"), TargetsCollator(collator, config.teacher_top_k),
        config, vocab, batch_size,
    )  # fmt: skip
    manifest["complete"] = True
    _write_json(manifest_path, manifest)
    return manifest, str(path)


def summary(manifest: dict, path: str, recipe: str | None = None, overrides: list[str] = ()) -> str:
    report, identity = manifest["report"], manifest["identity"]
    lines = ["", f"distill: teacher cache at {path}"]
    lines.append(
        f"  k {identity['k']}, temperature {identity['temperature']}, vocabulary {manifest['vocab_size']}, "
        f"teacher {manifest['teacher']}"
    )
    for name, split in manifest["splits"].items():
        lines.append(
            f"  {name:5s} {split['examples']} examples, {split['rows']} target tokens, {split['bytes'] / 1e6:.1f} MB, "
            f"mean teacher mass outside the top k {split['mean_tail_mass']:.2%}"
        )
    lines.append(f"  {manifest['bytes_per_token']:.0f} bytes per target token")
    if report is None:
        lines.append(
            f"  from the teacher server {manifest['teacher_server']}: its FLOPs computed from the teacher's config; "
            "no comparison with the full-vocabulary loss (that needs the teacher here)"
        )
    else:
        lines.append(
            f"  loss vs the full-vocabulary teacher, recipe student, first {report['tokens']} target tokens: "
            f"KD {report['kd_topk']:.4f} vs {report['kd_full']:.4f} ({report['kd_rel_error']:.2%}), "
            f"total {report['loss_topk']:.4f} vs {report['loss_full']:.4f} ({report['loss_rel_error']:.2%})"
        )
    lines.append(f"  train on it with: {train_command(identity['k'], path, recipe, overrides)}")
    return "\n".join(lines)


def train_command(k: int, path: str, recipe: str | None = None, overrides: list[str] = ()) -> str:
    """The `distill train` that reads this cache: the cache's recipe and overrides again, which the
    cache was built to match (k, temperature, data), and another output_dir when the recipe's already
    holds a finished run (which `distill train` would refuse to overwrite)."""
    import shlex

    from distill.config import _finished_run
    from distill.recipe import load_recipe

    if recipe is None:
        return f"distill train RECIPE.yaml --teacher_cache {path} --teacher_top_k {k}"
    args = [recipe, *overrides]
    output_dir = load_recipe(recipe, list(overrides)).get("output_dir")
    if output_dir and _finished_run(Path(output_dir)):
        args += ["--output_dir", f"{str(output_dir).rstrip('/')}_cached"]
    return "distill train " + " ".join(shlex.quote(str(a)) for a in args)
