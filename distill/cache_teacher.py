"""`distill cache-teacher`: run the teacher once over a recipe's data and write its top-k targets.

The cache's layout, identity checks and reader are :mod:`distill.teacher_cache`; this is the job that
fills it, here (the teacher model, measured) or from a ``teacher_server`` (computed), shard by shard,
resumable, and the report of how far the top-k loss is from the full one.
"""

from __future__ import annotations

import contextlib
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
from distill.teacher_cache import (
    ARRAYS,
    FORMAT,
    MANIFEST,
    TEACHER_TOKENIZER,
    CacheSplit,
    TargetsCollator,
    TeacherCache,
    mismatch,
    read_tokenizer,
    run_identity,
    teacher_mismatch,
    tokenizer_hash,
    write_json,
)
from distill.teacher_server import TeacherServer, check_run, served_tokenizer

SHARD_EXAMPLES = 1024  # examples per shard: a few to a few hundred MB at k = 64
REPORT_BATCHES = 4  # batches on which the build compares the top-k loss with the full one


def _final_hidden(model, inputs: dict) -> torch.Tensor:
    with final_hidden_states(model) as captured:
        model(**inputs, logits_to_keep=1)
    return captured["hidden"]


def target_rows(batch: dict, every_position: bool = False) -> torch.Tensor:
    """(batch, seq) bool: the positions the cache keeps a row for. Position p when label p + 1 is a
    target; in the teacher's token space every position of the row, since which of them a student
    aligns with depends on the student's tokenizer."""
    if every_position:
        return batch["attention_mask"].bool()
    return torch.nn.functional.pad(batch["labels"][:, 1:].ne(IGNORE_INDEX), (0, 1))


@torch.no_grad()
def teacher_targets(
    teacher,
    batch: dict,
    k: int,
    temperature: float,
    vocab: int,
    chunk: int = 1024,
    meter: FlopMeter | None = None,
    every_position: bool = False,
) -> TopKTargets:
    """Top-k targets of every row of a batch (`target_rows`), in row-major order, as fp32 tensors.

    From the final hidden states a chunk of rows at a time where the teacher allows it (the full
    logits of a batch are never made), else from its logits. ``meter`` counts the teacher's FLOPs.
    """
    measure = meter.measure if meter is not None else lambda *args, **kwargs: contextlib.nullcontext()
    target = target_rows(batch, every_position)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with measure("teacher", inputs):
        if supports_chunked_loss(teacher):
            rows, weight = _final_hidden(teacher, inputs)[target], output_weight(teacher)[:vocab]
            logits = (rows[i : i + chunk] @ weight.T for i in range(0, len(rows), chunk))
            # The output layer runs on target rows only: its FLOPs are per row, not per batch shape.
            with measure("teacher", {}, "output layer", units=len(rows), attention=False):
                parts = [teacher_topk(x, k, temperature) for x in logits]
        else:
            full = teacher(**inputs).logits[target][:, :vocab]
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


def served_targets(server: TeacherServer, size, batches: list[dict], every_position: bool = False):
    """Top-k targets of every row of each batch (`target_rows`), row-major, from a teacher server, with
    the FLOPs the server did (computed from the teacher's config, as the trainer bills them). All the
    batches are sent at once: the server works on the next while the answers of one are unpacked."""
    for request, batch in [(server.submit(batch, every_position), batch) for batch in batches]:
        scored = request.result()
        target = target_rows(batch, every_position).cpu()
        yield TopKTargets(*(t[target] for t in scored.targets)), scored.flops(size)


def write_split(
    directory: Path, data, teacher, collator, *, k, temperature, vocab, batch_size, per_shard, progress,
    every_position=False,
):  # fmt: skip
    """Cache ``data``'s targets under ``directory``, skipping shards that are already complete.
    ``teacher``: the model, or a (TeacherServer, its ModelSize) pair. ``every_position``: the teacher's
    token space (`target_rows`), whose shards also keep each row's token (``input_ids``)."""
    served = isinstance(teacher, tuple)
    device = "cpu" if served else next(teacher.parameters()).device
    meter = FlopMeter()  # one for the split: each batch shape is counted once, not once per shard
    for index in range(math.ceil(len(data) / per_shard)):
        final = directory / f"shard-{index:05d}"
        first, last = index * per_shard, min(len(data), (index + 1) * per_shard)
        if final.is_dir():
            progress.update(last - first)
            continue
        arrays = {name: [] for name in (*ARRAYS, "input_ids")}
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
            results = served_targets(*teacher, batches, every_position)
        else:
            results = (
                (teacher_targets(teacher, batch, k, temperature, vocab, meter=meter, every_position=every_position), 0)
                for batch in batches
            )
        for batch, (targets, flops) in zip(batches, results, strict=True):
            for name, dtype in ARRAYS.items():
                arrays[name].append(getattr(targets, name).cpu().numpy().astype(dtype))
            rows = target_rows(batch, every_position)
            arrays["input_ids"].append(batch["input_ids"][rows].cpu().numpy().astype(np.int32))
            counts += rows.sum(1).tolist()
            computed += flops
            progress.update(len(batch["labels"]))
        out = {name: np.concatenate(parts) for name, parts in arrays.items() if every_position or name in ARRAYS}
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

    from distill import xtoken
    from distill.config import TRAIN_ARGUMENTS
    from distill.data import Collator, build_datasets, split_rows, teacher_length
    from distill.models import (
        check_max_length,
        load_model,
        load_tokenizer,
        resolve,
        same_tokenizer,
        vocab_sizes_fit,
    )
    from distill.recipe import load_recipe, parse

    model_args, data_args, config = parse(load_recipe(recipe_path, overrides), TRAIN_ARGUMENTS)
    if config.teachers:
        raise UserError(
            "cache-teacher caches one teacher, and this recipe lists several (teachers): run it once per teacher "
            "(teacher_model_name_or_path and teacher_cache each), then list the caches under teachers"
        )
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
    # Set for a cache in the teacher's token space (another tokenizer than the student's); a served
    # teacher's is read from its files (no weights), or is the student's where there are none.
    teacher_tokenizer = (served_tokenizer if server else load_tokenizer)(config.teacher_model_name_or_path)
    if teacher_tokenizer is not None and same_tokenizer(tokenizer, teacher_tokenizer):
        teacher_tokenizer = None
    elif teacher_tokenizer is not None:
        xtoken.check_offsets(teacher_tokenizer, "teacher")
    if server is not None:
        pair = {}
        if teacher_tokenizer is not None:
            cut = teacher_length(config.teacher_model_name_or_path, data_args.max_length)
            pair = {"teacher_tokenizer": teacher_tokenizer, "teacher_max_length": cut}
        teacher_size = check_run(server, config, data_args, model_args, tokenizer, **pair)
    if teacher_tokenizer is None:
        with config.main_process_first(desc="tokenizing"):
            train_data, eval_data = build_datasets(data_args, tokenizer, seed=config.seed)
        identity = run_identity(config, data_args, tokenizer, train_data, eval_data)
    else:
        cut = teacher_length(config.teacher_model_name_or_path, data_args.max_length)
        with config.main_process_first(desc="tokenizing"):
            train_rows, eval_rows = split_rows(data_args, config.seed)
            train_data = teacher_side(train_rows, teacher_tokenizer, cut, f"dataset {data_args.dataset}")
            eval_data = None
            if eval_rows is not None:
                name = f"eval data {data_args.eval_dataset or data_args.dataset}"
                eval_data = teacher_side(eval_rows, teacher_tokenizer, cut, name)
        identity = run_identity(config, data_args, None, None, None, teacher_tokenizer, cut)
    splits = {name: d for name, d in (("train", train_data), ("eval", eval_data)) if d is not None}
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
        problems = mismatch(old["identity"], identity) + teacher_mismatch(
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
    path.mkdir(parents=True, exist_ok=True)

    if teacher_tokenizer is not None and server is not None:  # the teacher's alone, on the server
        teacher, teacher_vocab, vocab = (server, teacher_size), server.teacher_vocab, len(teacher_tokenizer)
        if not _tokenizer_saved(path, identity["tokenizer"]):
            teacher_tokenizer.save_pretrained(path / TEACHER_TOKENIZER)
    elif teacher_tokenizer is not None:  # the targets are the teacher's alone: no student runs
        teacher = load_model(
            config.teacher_model_name_or_path, config.resolved_teacher_dtype, model_args.attn_implementation
        )
        vocab_sizes_fit(teacher_tokenizer, teacher)
        # The tokenizer's ids, as a live teacher's top-k: a padded head's extra rows are no token.
        teacher_vocab, vocab = teacher.get_output_embeddings().weight.shape[0], len(teacher_tokenizer)
        teacher.to(config.device).eval()
        if not _tokenizer_saved(path, identity["tokenizer"]):
            teacher_tokenizer.save_pretrained(path / TEACHER_TOKENIZER)
    elif server is None:
        student = load_model(model_args.model_name_or_path, model_args.dtype, model_args.attn_implementation)
        teacher = load_model(
            config.teacher_model_name_or_path, config.resolved_teacher_dtype, model_args.attn_implementation
        )
        vocab_sizes_fit(tokenizer, student, teacher)
        teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
        vocab = min(student.get_output_embeddings().weight.shape[0], teacher_vocab)
        teacher.to(config.device).eval()
        student.to(config.device).eval()
    else:
        student = load_model(model_args.model_name_or_path, model_args.dtype, model_args.attn_implementation)
        vocab_sizes_fit(tokenizer, student)
        teacher, teacher_vocab, vocab = (server, teacher_size), server.teacher_vocab, server.vocab

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
    write_json(manifest_path, manifest)
    collator = Collator((teacher_tokenizer or tokenizer).pad_token_id)
    batch_size = config.per_device_eval_batch_size
    with tqdm(total=sum(len(d) for d in splits.values()), desc="cache-teacher", unit="example") as progress:
        for name, data in splits.items():
            write_split(
                path / name, data, teacher, collator, k=config.teacher_top_k, temperature=config.temperature,
                vocab=vocab, batch_size=batch_size, per_shard=examples_per_shard, progress=progress,
                every_position=teacher_tokenizer is not None,
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
    # The top-k loss against the full teacher's needs the full teacher: not with a server. In the
    # teacher's token space the live teacher's loss is itself top-k, of the same k: nothing to compare.
    manifest["report"] = None if server or teacher_tokenizer is not None else loss_error(
        student, teacher, train_data, cache.split("train"), TargetsCollator(collator, config.teacher_top_k),
        config, vocab, batch_size,
    )  # fmt: skip
    manifest["complete"] = True
    write_json(manifest_path, manifest)
    return manifest, str(path)


def teacher_side(rows, teacher_tokenizer, teacher_max_length: int, name: str):
    """The teacher's side of each row, as `distill.data.tokenize_pair` makes it for a live teacher
    (``xtoken.encode``, one document per row, cut at ``teacher_max_length``), as ``input_ids``
    (``labels``, which the collator pads, are the same ids: every position is a row). Every row is
    kept: which rows have targets left after the cut depends on the student."""
    from distill import xtoken
    from distill.data import check_has_targets, detect_format

    fmt = detect_format(rows, name)
    if fmt == "prompt":
        raise UserError(
            f"{name} has prompts only: a teacher cache holds the teacher's targets on completions; give a "
            "`completion` column (or `messages`), or train on-policy with the live teacher"
        )
    check_has_targets(rows, fmt, name)

    def side(row):
        ids = xtoken.encode(teacher_tokenizer, row, "teacher").ids[:teacher_max_length]
        return {"input_ids": ids, "labels": ids}

    return rows.map(side, remove_columns=rows.column_names, desc=f"Tokenizing {name} for the teacher")


def _tokenizer_saved(path: Path, digest: str) -> bool:
    """Whether ``path`` holds a teacher tokenizer that loads and has the vocabulary hash ``digest``."""
    try:
        return tokenizer_hash(read_tokenizer(path / TEACHER_TOKENIZER)) == digest
    except Exception:  # absent or damaged: written again
        return False


def summary(manifest: dict, path: str, recipe: str | None = None, overrides: list[str] = ()) -> str:
    report, identity = manifest["report"], manifest["identity"]
    lines = ["", f"distill: teacher cache at {path}"]
    lines.append(
        f"  k {identity['k']}, temperature {identity['temperature']}, vocabulary {manifest['vocab_size']}, "
        f"teacher {manifest['teacher']}"
    )
    teacher_space = identity.get("space") == "teacher"
    rows = "teacher positions" if teacher_space else "target tokens"
    for name, split in manifest["splits"].items():
        lines.append(
            f"  {name:5s} {split['examples']} examples, {split['rows']} {rows}, {split['bytes'] / 1e6:.1f} MB, "
            f"mean teacher mass outside the top k {split['mean_tail_mass']:.2%}"
        )
    lines.append(f"  {manifest['bytes_per_token']:.0f} bytes per {rows[:-1]}")
    if teacher_space:
        lines.append(
            f"  in the teacher's token space (its tokenizer is in {path}/{TEACHER_TOKENIZER}): a student with any "
            "tokenizer trains on it, aligned by byte offsets as with the live teacher"
        )
    elif report is None:
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
