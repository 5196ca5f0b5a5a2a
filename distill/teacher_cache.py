"""An offline teacher: run it once over the data, keep its top-k targets on disk, train without it.

This module is the cache's format and its reader; :mod:`distill.cache_teacher` is the job that writes
it. ``distill cache-teacher RECIPE.yaml`` tokenizes the recipe's data exactly as ``distill train`` will,
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

A teacher with another tokenizer than the recipe's student (`distill.xtoken`) gives a cache in the
*teacher's token space*, which serves a student with any tokenizer: each row (one document, not
packed) is tokenised the teacher's way and cut where a live teacher's side is cut
(`distill.data.teacher_length`), and every teacher position is a row, since which of them a student
aligns with depends on the student's tokenizer. Its shards also hold ``input_ids.npy`` (rows,) int32,
the teacher's token at each row, and the teacher's tokenizer is saved in ``PATH/teacher_tokenizer/``,
so training needs neither the teacher model nor its path. Training tokenises each row with both its
student's tokenizer and the cached one (`distill.data.tokenize_pair`, as with a live teacher), finds
the cached row with the same teacher tokens (the targets are a function of those alone), and compares
at aligned positions through the run's vocabulary map (`distill.teacher.CrossTopK`).

A same-space cache serves one run: its manifest records the tokenizer (a hash of its vocabulary), the data (a
hash of every example's token ids and labels), ``max_length``, k, the temperature, the teacher and
the vocabulary size. Training refuses a cache that differs in any of them, before loading a model.
The teacher is identified by what it is, not by where it is: a hash of its config and weight files
(:func:`distill.models.local_model_digest`) and the dtype it ran in. A teacher that is not on the
training machine cannot be checked, and is trusted with a note.
A teacher-space cache records the teacher's tokenizer instead of the student's and no data hash:
each row a run trains on must be a cached row, matched on its teacher tokens (`TeacherCache.attach`).
The temperature is part of it because top-k log-probabilities at one temperature cannot be
re-tempered: the tail's mass at another T depends on the logits that were dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from distill.errors import UserError
from distill.losses import IGNORE_INDEX, TopKTargets
from distill.models import local_model_digest, with_pad_token

FORMAT = 2  # 2: the teacher is identified by its files and dtype (teacher_fingerprint), + teacher_cost
MANIFEST = "manifest.json"
TEACHER_TOKENIZER = "teacher_tokenizer"  # the folder of a teacher-space cache's tokenizer
ARRAYS = {"logprobs": np.float32, "ids": np.int32, "tail": np.float32}
_IDENTITY_NAMES = {
    "space": "the token space of the targets (teacher: built for a student with another tokenizer)",
    "tokenizer": "tokenizer",
    "teacher_max_length": "the teacher's cut of a row (2 x max_length within its positions)",
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


def read_tokenizer(folder: Path):
    """A tokenizer saved by `save_pretrained` alone (no model config beside it)."""
    from transformers import AutoTokenizer

    return with_pad_token(AutoTokenizer.from_pretrained(str(folder)))


def run_identity(
    config, data_args, tokenizer, train_data, eval_data, teacher_tokenizer=None, teacher_max_length=None
) -> dict:
    """What a cache must have been built for to serve this run. With ``teacher_tokenizer`` (a cache in
    the teacher's token space): that tokenizer and ``teacher_max_length`` in place of the student's
    tokenizer and the data hash, which a teacher-space cache does not pin (its rows are matched one by
    one on the teacher's tokens, `TeacherCache.attach`)."""
    if teacher_tokenizer is not None:
        return {
            "space": "teacher",
            "tokenizer": tokenizer_hash(teacher_tokenizer),
            "teacher_max_length": teacher_max_length,
            "max_length": data_args.max_length,
            "k": config.teacher_top_k,
            "temperature": config.temperature,
        }
    return {
        "tokenizer": tokenizer_hash(tokenizer),
        "datasets": {"train": data_fingerprint(train_data), "eval": data_fingerprint(eval_data)},
        "max_length": data_args.max_length,
        "k": config.teacher_top_k,
        "temperature": config.temperature,
    }


def mismatch(cached: dict, wanted: dict) -> list[str]:
    return [
        f"{_IDENTITY_NAMES[key]} (cache: {_short(cached.get(key))}, this run: {_short(wanted.get(key))})"
        for key in _IDENTITY_NAMES
        if cached.get(key) != wanted.get(key)
    ]


def teacher_mismatch(cached: dict, wanted: dict, cached_name: str | None, wanted_name: str | None) -> list[str]:
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


def write_json(path: Path, data: dict) -> None:
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
        # Targets over the teacher tokenizer's ids at the teacher's positions (see the module note).
        self.teacher_space = self.manifest["identity"].get("space") == "teacher"
        self.teacher_max_length = self.manifest["identity"].get("teacher_max_length")

    def teacher_tokenizer(self):
        """The teacher's tokenizer saved in a teacher-space cache, checked against the manifest."""
        where = self.path / TEACHER_TOKENIZER
        if not where.is_dir():
            raise UserError(
                f"teacher_cache {self.path} is in the teacher's token space but holds no {TEACHER_TOKENIZER}/ folder "
                "(the teacher's tokenizer): copy the whole cache folder, or build it again with `distill cache-teacher`"
            )
        try:
            tokenizer = read_tokenizer(where)
        except Exception as err:  # a damaged file surfaces as many exception types
            raise UserError(
                f"teacher_cache {self.path}: the teacher's tokenizer in {where} does not load ({type(err).__name__}: "
                f"{err}); copy it again from the cache's source, or build the cache again"
            ) from err
        if tokenizer_hash(tokenizer) != self.manifest["identity"]["tokenizer"]:
            raise UserError(
                f"teacher_cache {self.path}: the tokenizer in {where} is not the one the cache was built with "
                f"(vocabulary hash {tokenizer_hash(tokenizer)[:12]}, the manifest's "
                f"{self.manifest['identity']['tokenizer'][:12]}); copy it again from the cache's source, or build "
                "the cache again"
            )
        return tokenizer

    def check(self, identity: dict) -> None:
        """UserError unless the cache was built for a run with this identity."""
        self._refuse(mismatch(self.manifest["identity"], identity))

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
        self._refuse(teacher_mismatch(built, {"files": digest, "dtype": dtype}, self.manifest["teacher"], teacher))
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

    def attach(self, name: str, data, key: str = "teacher_targets", column: str = "teacher_input_ids", rows=None):
        """``data`` (a tokenized dataset of this run) whose rows carry their cached targets as ``key``. In
        the teacher's token space each row's are the cached row's with the same teacher tokens (read from
        ``column`` of ``rows``, by default ``data``: one of several teachers' names its own, and ``data``
        may already be wrapped for another); UserError if some row has none (the cache was built for other
        data)."""
        if data is None:
            return None
        if not self.teacher_space:
            return WithTeacherTargets(data, self.split(name), key)
        if name not in self.manifest["splits"]:
            raise UserError(
                f"teacher_cache {self.path} holds no {name} split: build it with a recipe that has {name} data, "
                f"or train without {name} data"
            )
        split = self.split(name)
        index = split.rows_of(data if rows is None else rows, column)
        missing = index.count(-1)
        if missing:
            raise UserError(
                f"teacher_cache {self.path}: {missing} of {len(index)} {name} rows are not in the cache (no cached row "
                "has their teacher tokens): it was built for other data. Rebuild it with `distill cache-teacher` on "
                "this recipe, or restore the data it was built with"
            )
        return WithTeacherTargets(data, split, key, index)


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
            names = (*ARRAYS, "offsets") + (("input_ids",) if (where / "input_ids.npy").is_file() else ())
            self._shards[index] = {name: np.load(where / f"{name}.npy", mmap_mode="r") for name in names}
        return self._shards[index]

    def _rows(self, i: int) -> tuple[dict, int, int]:
        if not 0 <= i < self.examples:
            raise IndexError(i)
        shard = self._shard(i // self.per_shard)
        lo, hi = shard["offsets"][i % self.per_shard : i % self.per_shard + 2]
        return shard, lo, hi

    def tokens(self, i: int) -> np.ndarray:
        """The teacher's tokens of example ``i`` (a teacher-space cache: one row per token)."""
        shard, lo, hi = self._rows(i)
        return shard["input_ids"][lo:hi]

    def rows_of(self, data, column: str = "teacher_input_ids") -> list[int]:
        """For each row of ``data`` (made by `distill.data.tokenize_pair`), the example whose teacher
        tokens are its ``teacher_input_ids``, or -1. A teacher's targets depend on its tokens only, so
        rows with the same tokens share them."""
        where: dict[bytes, int] = {}
        for e in range(self.examples):
            where.setdefault(_tokens_key(self.tokens(e)), e)
        return [
            where.get(_tokens_key(ids), -1)
            for batch in data.select_columns([column]).iter(batch_size=1024)
            for ids in batch[column]
        ]

    def example(self, i: int) -> TopKTargets:
        """Targets of example ``i``'s target positions, in order, as numpy arrays."""
        shard, lo, hi = self._rows(i)
        return TopKTargets(*(shard[name][lo:hi] for name in ARRAYS))


def _tokens_key(ids) -> bytes:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class WithTeacherTargets(torch.utils.data.Dataset):
    """A tokenized dataset whose rows also carry ``teacher_targets`` (or ``key``: one of several
    teachers') from a :class:`CacheSplit`: row i's are example i's, or with ``index`` example
    ``index[i]``'s."""

    def __init__(self, data, split: CacheSplit, key: str = "teacher_targets", index: list[int] | None = None):
        if index is None and len(data) != split.examples:
            raise ValueError(f"the cache holds {split.examples} examples but the data has {len(data)}")
        self.data, self.split, self.key, self.index = data, split, key, index

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], self.key: self.split.example(i if self.index is None else self.index[i])}


class TargetsCollator:
    """Wraps a collator: adds ``teacher_logprobs`` / ``teacher_ids`` (batch, seq, k) and
    ``teacher_tail`` (batch, seq), aligned with the logits (position p holds the targets for label
    p + 1). Positions without a target hold zeros, which the losses never read. ``teacher_space``:
    aligned with the teacher's side of the batch instead (``teacher_input_ids``: every position)."""

    def __init__(self, collator, k: int, teacher_space: bool = False):
        self.collator, self.k, self.teacher_space = collator, k, teacher_space

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collator(rows)
        labels = batch["labels"]
        b, width = (batch["teacher_input_ids"] if self.teacher_space else labels).shape
        logprobs = torch.zeros(b, width, self.k)
        ids = torch.zeros(b, width, self.k, dtype=torch.int32)
        tail = torch.zeros(b, width)
        for j, row in enumerate(rows):
            if self.teacher_space:
                positions = torch.arange(len(row["teacher_input_ids"]))
            else:
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
