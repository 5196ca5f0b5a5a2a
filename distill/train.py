"""The `distill train` job: recipe -> checked inputs -> data -> models -> DistillTrainer -> saved student.

Everything a user can get wrong is checked in that order, cheapest first, so a bad path, a
mismatched tokenizer or an unusable dataset fails before any model weight is read.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import AutoConfig, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from distill import adapters, xtoken
from distill.config import TRAIN_ARGUMENTS
from distill.console import quiet_libraries, use_console
from distill.data import (
    Collator,
    TeachersCollator,
    build_datasets,
    detect_format,
    keyed,
    load_rows,
    teacher_length,
    unaligned_share,
)
from distill.errors import UserError
from distill.flops import model_size
from distill.hidden import layer_pairs
from distill.models import (
    check_max_length,
    file_damage,
    follow_umask,
    load_model,
    load_tokenizer,
    resolve,
    same_tokenizer,
    vocab_sizes_fit,
)
from distill.on_policy import StudentServer, prompts_of
from distill.recipe import load_recipe, parse
from distill.teacher import CachedTeacher, ModelTeacher, ServedTeacher
from distill.teacher_cache import MANIFEST, TargetsCollator, TeacherCache, run_identity
from distill.teacher_server import ServedTargetsCollator, TeacherServer, check_run, served_tokenizer
from distill.trainer import DistillTrainer, reads_targets

ARGUMENTS = TRAIN_ARGUMENTS


def resume_checkpoint(config) -> str | None:
    """The checkpoint to resume from, checked whole. `resume_from_checkpoint: true` (or "last") means
    the newest checkpoint in output_dir.

    A save killed midway (preemption, a full disk) can leave the newest checkpoint with a file cut
    short; resuming from it would fail deep inside torch.load or safetensors after the models loaded,
    or not fail at all. Each file is checked as far as its format allows without reading the weights."""
    value = config.resume_from_checkpoint
    if value in (True, "true", "True", "last"):
        value = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
        if value is None:
            raise UserError(f"resume_from_checkpoint is set but {config.output_dir} holds no checkpoint-* folder")
    elif value and not os.path.isdir(value):
        raise UserError(f"resume_from_checkpoint: {value} is not a checkpoint directory")
    if not value:
        return None

    def first_damage(folder: Path) -> str | None:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            if (why := file_damage(f)) is not None:
                return f"{f.relative_to(folder)}: {why}"
        return None

    def step(folder: Path) -> int:  # -1: not a checkpoint-N folder
        number = folder.name.removeprefix("checkpoint-")
        return int(number) if number.isdigit() and folder.is_dir() else -1

    checkpoint = Path(value)
    damage = first_damage(checkpoint)
    if damage is None:
        return value
    earlier = sorted((p for p in checkpoint.parent.iterdir() if 0 <= step(p) < step(checkpoint)), key=step)
    whole = next((p for p in reversed(earlier) if first_damage(p) is None), None)
    fix = (
        f"resume from the one before with --resume_from_checkpoint {whole}, or delete {checkpoint}"
        if whole
        else f"no earlier checkpoint is whole: delete {checkpoint} and train from the start"
    )
    raise UserError(f"checkpoint {checkpoint} is damaged ({damage}); {fix}")


def save_run_files(output_dir: str, recipe: dict, metrics: dict) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


@dataclass
class Teacher:
    """One teacher as the checks found it, before any data or weights are read."""

    model: str | None  # its model's path or hub id (a served teacher: the model served; a cache: if named)
    cache: TeacherCache | None = None
    server: TeacherServer | None = None
    tokenizer: object = None  # its tokenizer, where it is not the student's
    cut: int | None = None  # where its side of a row is cut, with another tokenizer
    size: object = None  # a served teacher's ModelSize (teacher_server.check_run)


def run(recipe_path: str, overrides: list[str] | None = None) -> dict:
    """`distill train`: one teacher (``teacher_model_name_or_path``, ``teacher_cache`` or ``teacher_server``)
    or several (``teachers:``, each a model, a cache or a server URL), on one path. Several teachers' columns
    and batch keys are named ``name@i`` (distill.data.own_keys), one vocabulary map per teacher with another
    tokenizer (``vocab_map_i.safetensors``), one bill line each; one teacher keeps the plain names."""
    recipe = load_recipe(recipe_path, overrides)
    model_args, data_args, config = parse(recipe, ARGUMENTS)
    resume = resume_checkpoint(config)
    config.check_output_dir(resuming=resume is not None)
    quiet_libraries(data_args.dataset, data_args.eval_dataset)
    adapters.check(model_args, config)
    resolve(model_args.model_name_or_path)
    sampled = config.max_new_tokens if config.lmbda > 0 else 0  # on-policy rows: a prompt + the student's sample
    check_max_length(model_args.model_name_or_path, data_args.max_length, "student", sampled)
    several = bool(config.teachers)
    # With a teacher cache or server no teacher is loaded, or even needs to be on this machine.
    if several:
        if config.use_vllm:
            raise UserError("use_vllm with several teachers is not implemented; sample with generate (use_vllm: false)")
        teachers = [listed_teacher(config, data_args, entry, sampled) for entry in config.teachers]
    else:
        teachers = [one_teacher(config, data_args, sampled)]

    if config.hidden_loss_weight > 0:  # the layer map against both configs, before any weight loads
        student_dir = resolve(model_args.model_name_or_path)[0]
        student_config = AutoConfig.from_pretrained(student_dir)
        where, gguf_file = resolve(config.teacher_model_name_or_path)
        teacher_config = AutoConfig.from_pretrained(where, gguf_file=gguf_file)
        layer_pairs(
            config.hidden_layer_map, student_dir, student_config.num_hidden_layers, teacher_config.num_hidden_layers
        )

    student_server = None
    if config.use_vllm:
        if model_args.use_peft:
            raise UserError(
                "use_vllm pushes the whole student to the server, and use_peft trains an adapter: not implemented "
                "together; sample with transformers' generate (use_vllm: false)"
            )
        student_server = StudentServer(config.vllm_server, size=model_size(model_args.model_name_or_path))
        student_server.check(model_args.model_name_or_path)

    tokenizer = load_tokenizer(model_args.model_name_or_path)
    for teacher in teachers:
        find_tokenizer(config, data_args, tokenizer, teacher)
    for teacher in teachers:
        if teacher.server is not None:
            pair = (
                {"teacher_tokenizer": teacher.tokenizer, "teacher_max_length": teacher.cut} if teacher.tokenizer else {}
            )
            named = as_teacher(config, teacher_model_name_or_path=teacher.model)
            teacher.size = check_run(teacher.server, named, data_args, model_args, tokenizer, **pair)

    # Each teacher with another tokenizer adds its side of every row (the student's side is the same in each).
    build = {"seed": config.seed, "prompts_only": config.lmbda == 1}
    other = [i for i, t in enumerate(teachers) if t.tokenizer is not None]
    cross, vocab_maps = {}, {}
    with config.main_process_first(desc="tokenizing"):
        if not other:
            train_data, eval_data = build_datasets(data_args, tokenizer, **build)
        for i in other:
            pair = {"teacher_tokenizer": teachers[i].tokenizer, "teacher_max_length": teachers[i].cut}
            pair_train, pair_eval = build_datasets(data_args, tokenizer, **build, **pair)
            cross[i] = coverage(pair_train, pair_eval)
            if several:
                pair_train, pair_eval = (
                    None if d is None else d.rename_columns({k: keyed(k, i) for k in TEACHER_COLUMNS})
                    for d in (pair_train, pair_eval)
                )
            if i == other[0]:
                train_data, eval_data = pair_train, pair_eval
            else:
                train_data, eval_data = _with_columns(train_data, eval_data, pair_train, pair_eval, i)
    for i in other:
        name = f"vocab_map_{i}.safetensors" if several else VOCAB_MAP
        with config.main_process_first(desc="vocabulary map"):  # the others read the map process 0 wrote
            vocab_maps[i] = run_vocab_map(config, data_args, tokenizer, teachers[i].tokenizer, name)
        if config.process_index == 0:
            line = coverage_line(cross[i], tokenizer, teachers[i].tokenizer)
            if several:
                line = f"distill: teacher {i} ({config.teachers[i]}): " + line.removeprefix("distill: ")
            print(line, flush=True)
    rows = {"train": train_data, "eval": eval_data}  # before any cache wraps them
    for i, teacher in enumerate(teachers):
        cache = teacher.cache
        if cache is None:
            continue
        if cache.teacher_space:  # the student's tokenizer is not pinned; each row is found by its teacher tokens
            cache.check(run_identity(config, data_args, None, None, None, teacher.tokenizer, cache.teacher_max_length))
        else:
            cache.check(run_identity(config, data_args, tokenizer, rows["train"], rows["eval"]))
        suffix = i if several else None  # one teacher's keys keep their plain names
        column, key = keyed("teacher_input_ids", suffix), keyed("teacher_targets", suffix)
        train_data = cache.attach("train", train_data, key, column, rows["train"])
        eval_data = cache.attach("eval", eval_data, key, column, rows["eval"])
    if config.lmbda > 0:
        prompts_of(Collator(tokenizer.pad_token_id)([train_data[0]]))  # on-policy needs prompts: not text data

    student = adapters.load_student(model_args, config)  # with LoRA adapters when use_peft is set
    if config.process_index == 0:
        print(adapters.trainable_parameters(student), flush=True)
    sources, collators = [], []
    weights = config.teacher_weights if several and config.teacher_weights else [1.0] * len(teachers)
    for i, teacher in enumerate(teachers):
        source, collator = teacher_source(
            config, model_args, tokenizer, student, model_path=teacher.model, cache=teacher.cache,
            server=teacher.server, size=teacher.size, teacher_tokenizer=teacher.tokenizer, vocab_map=vocab_maps.get(i),
            weight=weights[i],
        )  # fmt: skip
        sources.append(source)
        collators.append(collator)

    # The "before" evaluation runs inside train(), once the engine has prepared the student. Called
    # before train(), evaluate() prepares the student for evaluation only: accelerate then never
    # wraps it in DDP (each process would silently train on its own gradients) and FSDP2 refuses a
    # model without its optimizer.
    config.eval_on_start = eval_data is not None and not resume
    trainer = DistillTrainer(
        model=student,
        teacher=sources if several else sources[0],
        args=config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        data_collator=TeachersCollator(Collator(tokenizer.pad_token_id), collators) if several else collators[0],
        student_server=student_server,
    )
    extra = None
    if cross and several:
        extra = {"cross_tokenizer_teachers": {config.teachers[i]: c for i, c in cross.items()}}
    elif cross:
        extra = {"cross_tokenizer": cross[0]}
    return train_and_save(trainer, recipe, resume, summary, extra)


def one_teacher(config, data_args, sampled: int) -> Teacher:
    """The recipe's one teacher: a cache, a vLLM server or a model."""
    if config.teacher_cache and config.teacher_server:
        raise UserError(
            "teacher_cache and teacher_server are both set, and training reads its targets from one: drop "
            "teacher_server to train from the cache (`distill cache-teacher` is what fills a cache from a server)"
        )
    if config.teacher_server:
        return Teacher(config.teacher_model_name_or_path, server=TeacherServer.of_recipe(config))
    if config.teacher_cache:
        cache = TeacherCache(config.teacher_cache)
        note = cache.check_teacher(config.teacher_model_name_or_path, config.resolved_teacher_dtype)
        if note and config.process_index == 0:
            print(note, flush=True)
        return Teacher(config.teacher_model_name_or_path, cache=cache)
    resolve(config.teacher_model_name_or_path)
    check_max_length(config.teacher_model_name_or_path, data_args.max_length, "teacher", sampled)
    return Teacher(config.teacher_model_name_or_path)


def listed_teacher(config, data_args, entry: str, sampled: int) -> Teacher:
    """One entry of ``teachers:``: a vLLM server's URL, a cache directory, or a model."""
    if entry.startswith(("http://", "https://")):
        server = TeacherServer.of_recipe(as_teacher(config, teacher_server=entry))
        served = server.models()
        if len(served) != 1:
            raise UserError(
                f"teachers: {entry} serves {len(served)} models; a teacher's server must serve one (its config "
                "and tokenizer are read here for the bill and the data)"
            )
        name = str(served[0].get("root") or served[0].get("id"))
        resolve(name)  # its config.json (and tokenizer files) must be readable here; not its weights
        return Teacher(name, server=server)
    if (Path(entry) / MANIFEST).is_file():
        if config.lmbda > 0:
            raise UserError(
                f"teachers: {entry} is a cache, and lmbda > 0 needs teachers that grade the student's own "
                "samples; list the teacher's model instead"
            )
        return Teacher(None, cache=TeacherCache(entry))
    resolve(entry)
    check_max_length(entry, data_args.max_length, f"teacher {entry}", sampled)
    return Teacher(entry)


def find_tokenizer(config, data_args, tokenizer, teacher: Teacher) -> None:
    """Sets ``teacher.tokenizer`` (and its cut) where it is not the student's: a served teacher's tokenizer
    files are read too (its weights need not be here); a teacher-space cache's is the one it saved, with
    its cut; a same-space cache has the student's."""
    if teacher.cache is not None:
        if teacher.cache.teacher_space:
            teacher.tokenizer, teacher.cut = teacher.cache.teacher_tokenizer(), teacher.cache.teacher_max_length
    else:
        theirs = (load_tokenizer if teacher.server is None else served_tokenizer)(teacher.model)
        if theirs is not None and not same_tokenizer(tokenizer, theirs):
            teacher.tokenizer, teacher.cut = theirs, teacher_length(teacher.model, data_args.max_length)
    if teacher.tokenizer is not None:
        check_cross_tokenizer(config, tokenizer, teacher.tokenizer)


def check_cross_tokenizer(config, tokenizer, teacher_tokenizer) -> None:
    """A teacher (live or served) with another tokenizer: what can be refused before any data or model is read."""
    xtoken.check_offsets(tokenizer, "student")
    xtoken.check_offsets(teacher_tokenizer, "teacher")
    if config.hidden_loss_weight > 0:
        raise UserError(
            "hidden_loss_weight > 0 compares hidden states position by position, which a teacher with another "
            "tokenizer does not share with the student; set hidden_loss_weight: 0, or use a teacher of the "
            "student's family"
        )
    if config.lmbda > 0:
        raise UserError(
            "lmbda > 0 (on-policy) with a teacher whose tokenizer differs from the student's is not implemented: "
            "the student's samples would have to be re-tokenised for the teacher at every step. Set lmbda: 0, or "
            "use a teacher of the student's family"
        )


VOCAB_MAP = "vocab_map.safetensors"


def run_vocab_map(config, data_args, tokenizer, teacher_tokenizer, name: str = VOCAB_MAP) -> xtoken.VocabMap:
    """The (student, teacher) vocabulary map, built once per run and saved beside it
    (OUTPUT_DIR/vocab_map.safetensors); a resumed run reads it back, refusing one of another pair.
    Chat data pins the student's end-of-turn token to the teacher's, which is what an aligned end of
    turn compares; other data pins eos to eos."""
    fmt = detect_format(load_rows(data_args.dataset, data_args.dataset_config, data_args.dataset_split))
    pairs = xtoken.pinned_pairs(fmt, tokenizer, teacher_tokenizer)
    path = Path(config.output_dir) / name
    if path.is_file():
        return xtoken.VocabMap.load(path, tokenizer, teacher_tokenizer, pairs)
    vocab_map = xtoken.build_vocab_map(tokenizer, teacher_tokenizer, special_pairs=pairs)
    if config.process_index == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        vocab_map.save(path)
    return vocab_map


def teacher_source(config, model_args, tokenizer, student, *, model_path, cache, server, size, teacher_tokenizer,
                   vocab_map, weight: float = 1.0):  # fmt: skip
    """One teacher's source of targets (distill.teacher) and the collator of its side of a batch, from what
    the checks found: a vLLM ``server`` (``size``: its model's), a ``cache``, or else the model at
    ``model_path``, loaded here; ``teacher_tokenizer`` and ``vocab_map`` where its tokenizer is not the
    student's; ``weight`` its weight among several. The vocabulary checks run here, once the student is loaded."""
    pad = tokenizer.pad_token_id
    cross = teacher_tokenizer is not None
    collator = Collator(pad, teacher_pad_token_id=teacher_tokenizer.pad_token_id) if cross else Collator(pad)
    mapped = (vocab_map, config.xtoken_loss) if cross else ()
    if server is not None:
        vocab_sizes_fit(tokenizer, student)
        # Asked for one batch ahead, except where they would go unread: on-policy batches are replaced
        # after collation (their targets are asked for when they exist), and alpha 0 or weight 0 reads
        # none in training.
        if config.lmbda == 0 and reads_targets(config, weight):
            collator = ServedTargetsCollator(collator, server)
        return ServedTeacher(server, size, *mapped), collator
    if cache is not None:
        vocab_sizes_fit(tokenizer, student)
        if not cross:
            cache.check_student(student)
        return CachedTeacher(cache, *mapped), TargetsCollator(collator, cache.k, teacher_space=cross)
    model = load_model(model_path, config.resolved_teacher_dtype, model_args.attn_implementation)
    if not cross:
        vocab_sizes_fit(tokenizer, student, model)
        return ModelTeacher(model), collator
    vocab_sizes_fit(tokenizer, student)
    vocab_sizes_fit(teacher_tokenizer, model)
    return ModelTeacher(model, vocab_map, config.xtoken_loss, config.teacher_top_k), collator


def as_teacher(config, **keys):
    """A shallow copy of ``config`` naming one of several teachers the way a one-teacher recipe does
    (for the checks written for one teacher)."""
    one = copy.copy(config)
    for key, value in keys.items():
        setattr(one, key, value)
    return one


TEACHER_COLUMNS = ("teacher_input_ids", "alignment")  # a teacher with another tokenizer's side of a row


def _with_columns(train_data, eval_data, pair_train, pair_eval, i: int):
    """The rows with teacher ``i``'s columns added from its own tokenisation of the same rows."""
    out = []
    for data, pair in ((train_data, pair_train), (eval_data, pair_eval)):
        if data is None:
            out.append(None)
            continue
        if len(data) != len(pair) or any(data[j]["input_ids"] != pair[j]["input_ids"] for j in (0, len(data) - 1)):
            raise RuntimeError("two tokenisations of the same rows gave different student sides")  # a bug, not input
        for k in TEACHER_COLUMNS:
            data = data.add_column(keyed(k, i), pair[keyed(k, i)])
        out.append(data)
    return out


def coverage(train_data, eval_data) -> dict:
    """Target tokens with no teacher position (they train on the labels only), per split."""
    out = {}
    for split, rows in (("train", train_data), ("eval", eval_data)):
        if rows is not None:
            unaligned, targets = unaligned_share(rows)
            out[split] = {"unaligned_targets": unaligned, "targets": targets, "unaligned_share": unaligned / targets}
    return out


def coverage_line(cross: dict, tokenizer, teacher_tokenizer) -> str:
    shares = ", ".join(
        f"{split} {c['unaligned_targets']} of {c['targets']} ({c['unaligned_share']:.1%})" for split, c in cross.items()
    )
    return (
        f"distill: the teacher's tokenizer differs from the student's ({len(teacher_tokenizer)} vs {len(tokenizer)} "
        f"tokens): positions aligned by byte offsets, vocabularies mapped (distill.xtoken). Target tokens with no "
        f"teacher position, trained on the labels only: {shares}"
    )


def train_and_save(trainer, recipe: dict, resume: str | None, summarize, extra: dict | None = None) -> dict:
    """Train (the "before" evaluation is step 0's, via eval_on_start), evaluate, and write the model
    (or, with use_peft, only the adapter in PEFT's format) + tokenizer, trainer_state.json (the whole
    log history, for `distill eval --run_dir`), recipe.yaml and metrics.json (with ``extra``)."""
    config = trainer.args
    use_console(trainer)
    trainer.add_callback(CheckpointModes())
    train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    before = evaluation_at_start(trainer.state.log_history) if config.eval_on_start else {}
    after = trainer.evaluate() if trainer.eval_dataset is not None else {}
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if trainer.is_local_process_zero():
        follow_umask(config.output_dir)

    metrics = {"train": train_metrics, "eval_before": before, "eval": after, "global_step": trainer.state.global_step}
    metrics |= extra or {}
    if trainer.is_world_process_zero():
        save_run_files(config.output_dir, recipe, metrics)
        write_model_card(trainer, recipe, metrics, config.output_dir)
        print(summarize(trainer, metrics, config.output_dir))
    return metrics


class CheckpointModes(TrainerCallback):
    """`follow_umask` on each checkpoint as it is saved, so that an interrupted run's are right too."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_local_process_zero:
            follow_umask(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _on_hub(name: str | None) -> bool:
    """Whether ``name`` reads as a hub id rather than a path here (as Trainer.create_model_card
    decides for base_model): a hub's metadata may only name what the hub has."""
    return bool(name) and not os.path.exists(name) and not name.startswith((".", "/", "~"))


def _named(name: str) -> str:
    return f"[{name}](https://huggingface.co/{name})" if _on_hub(name) else f"`{name}`"


def teacher_list(config) -> str:
    """The teachers of a ``teachers:`` run with their weights (after division by their sum)."""
    return ", ".join(f"{_named(t)} (w = {w:.3g})" for t, w in zip(config.teachers, config.teacher_weights))


def _card_metrics(metrics: dict) -> list[tuple[str, object, object]]:
    """(name, before, after) of the held-out numbers, without the timings."""
    timings = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return [
        (key.removeprefix("eval_"), metrics["eval_before"].get(key.replace("eval_", "eval_before_", 1)), value)
        for key, value in metrics["eval"].items()
        if not key.endswith(timings)
    ]


def write_model_card(trainer, recipe: dict, metrics: dict, output_dir: str) -> None:
    """``README.md``, the model card a hub shows for the folder, written the way
    `Trainer.create_model_card` and PEFT write theirs: YAML front matter (library_name, base_model,
    tags, datasets where they are hub names), then what the run was: teacher, student, data, the
    held-out numbers before and after, the measured bill (cost_report.json) and the recipe."""
    import peft
    import torch
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    import distill

    config, out = trainer.args, Path(output_dir)
    adapter = isinstance(trainer.model, peft.PeftModel)
    distilling = isinstance(trainer, DistillTrainer)
    student = recipe["model_name_or_path"]
    teacher = getattr(config, "teacher_model_name_or_path", None)
    if distilling and config.teacher_cache:
        teacher = TeacherCache(config.teacher_cache).manifest["teacher"]
    data = [d for d in (recipe.get("dataset"), recipe.get("eval_dataset")) if d]
    tags = ["distill", "knowledge-distillation" if distilling else "fine-tuned", "generated_from_trainer"]
    if adapter:
        tags += ["lora", "transformers"] + ([f"base_model:adapter:{student}"] if _on_hub(student) else [])
    front = ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=student if _on_hub(student) else None,
        tags=tags,
        datasets=[d for d in data if _on_hub(d)] or None,
        pipeline_tag="text-generation",
    )

    lines = [f"# {out.resolve().name}", ""]
    if distilling:
        lines.append(
            f"{'A LoRA adapter for' if adapter else 'A student model initialised from'} {_named(student)}, "
            f"distilled from the teacher {_named(teacher)} with `distill train`: loss = {config.alpha} x "
            f"T^2 x {config.loss_type}(teacher, student) + {1 - config.alpha:g} x cross-entropy, "
            if not config.teachers
            else f"distilled from the teachers {teacher_list(config)} with `distill train`: loss = {config.alpha} x "
            f"T^2 x sum_i w_i {config.loss_type}(teacher_i, student) + {1 - config.alpha:g} x cross-entropy, "
            f"T = {config.temperature}"
            + (
                f" + {config.hidden_loss_weight:g} x {config.hidden_loss_type} on aligned hidden states."
                if config.hidden_loss_weight > 0
                else "."
            )
            + (
                f" The teacher's tokenizer differs from the student's: positions aligned by byte offsets, the "
                f"student's distribution mapped into the teacher's vocabulary ({config.xtoken_loss} loss on its "
                f"top {config.teacher_top_k} ids; map in `{VOCAB_MAP}`)."
                if (out / VOCAB_MAP).is_file()
                else ""
            )
        )
    else:
        lines.append(
            f"{'A LoRA adapter for' if adapter else 'A fine-tuned version of'} {_named(student)}, trained with "
            "`distill finetune` (supervised: cross-entropy on the target tokens)."
        )
    lines += ["", "## Training", "", "| | |", "|---|---|", f"| student | {_named(student)} |"]
    if distilling:
        source = (
            f" (its top-k targets, cached in `{config.teacher_cache}`)" if config.teacher_cache
            else f" (its top-k targets, served by vLLM at {config.teacher_server})" if config.teacher_server
            else ""
        )  # fmt: skip
        lines.append(
            f"| teachers | {teacher_list(config)} |" if config.teachers else f"| teacher | {_named(teacher)}{source} |"
        )
    lines.append(f"| training data | {_named(recipe['dataset'])} |")
    if recipe.get("eval_dataset"):
        lines.append(f"| held-out data | {_named(recipe['eval_dataset'])} |")
    lines += [f"| optimizer steps | {metrics['global_step']} |", ""]

    if metrics["eval"]:
        lines += ["## Held-out results", "", "| metric | before training | after training |", "|---|---:|---:|"]
        for name, before, after in _card_metrics(metrics):
            lines.append(f"| {name} | {'n/a' if before is None else f'{before:.4f}'} | {after:.4f} |")
        lines.append("")

    report = out / "cost_report.json"
    if report.is_file():
        bill = json.loads(report.read_text(encoding="utf-8"))
        lines += ["## What it cost (measured)", "", "| | FLOPs | PFlop/s-days |", "|---|---:|---:|"]
        # The teacher's row says 0 for a distillation at alpha 0; fine-tuning has no teacher.
        roles = [r for r, flops in bill["flops"].items() if flops or r == "total" or (r == "teacher" and distilling)]
        for role in roles:
            lines.append(f"| {role} | {bill['flops'][role]:,} | {bill['pflops_days'][role]:.4g} |")
        lines += [
            "",
            f"{bill['tokens']:,} tokens in {bill['wall_seconds']:.1f} s on {bill['devices']} device(s)"
            + (f", ${bill['cost_usd']:.2f}" if bill.get("cost_usd") is not None else "")
            + " (the figures of `cost_report.json`).",
            "",
        ]

    load = (
        f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{student}"), "{output_dir}")'
        if adapter
        else f'AutoModelForCausalLM.from_pretrained("{output_dir}")'
    )
    lines += [
        "## Use it",
        "",
        "```python",
        *(["from peft import PeftModel"] if adapter else []),
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = {load}",
        f'tokenizer = AutoTokenizer.from_pretrained("{output_dir}")',
        "```",
        "",
        "## Recipe",
        "",
        "As resolved, overrides included (`recipe.yaml`):",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False).rstrip(),
        "```",
        "",
        "### Framework versions",
        "",
        f"- distill {distill.__version__}",
        f"- Transformers {transformers.__version__}",
        f"- PyTorch {torch.__version__}",
        *([f"- PEFT {peft.__version__}"] if adapter else []),
    ]
    ModelCard(f"---\n{front.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").save(out / "README.md")


def evaluation_at_start(history: list[dict]) -> dict:
    """The step-0 evaluation (eval_on_start) from the log history, keys renamed eval_* -> eval_before_*."""
    logged = next(h for h in history if h.get("step") == 0 and any(k.startswith("eval_") for k in h))
    return {k.replace("eval_", "eval_before_", 1): v for k, v in logged.items() if k.startswith("eval_")}


def _last(history: list[dict], key: str):
    return next((h[key] for h in reversed(history) if key in h), None)


def summary(trainer, metrics: dict, output_dir: str) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    history = trainer.state.log_history
    lines = [
        "",
        "distill: done",
        f"  steps            {metrics['global_step']}",
        f"  final kd_loss    {fmt(_last(history, 'kd_loss'))}"
        + (" (alpha 0: the teacher does not run in training)" if trainer.args.alpha == 0 else ""),
        f"  final ce_loss    {fmt(_last(history, 'ce_loss'))}",
    ]
    if trainer.args.hidden_loss_weight > 0:
        lines.append(f"  final hidden_loss {fmt(_last(history, 'hidden_loss'))}")
    if metrics["eval"]:
        before = metrics["eval_before"].get("eval_before_agreement")
        lines.append(
            f"  agreement with teacher (held out)  before {fmt(before)}  after {fmt(metrics['eval']['eval_agreement'])}"
            + (" (the teachers', weighted)" if trainer.args.teachers else "")
        )
        lines.append(
            f"  held-out KL to teacher            before {fmt(metrics['eval_before'].get('eval_before_kd_loss'))}"
            f"  after {fmt(metrics['eval']['eval_kd_loss'])}" + (" (weighted)" if trainer.args.teachers else "")
        )
    for i, name in enumerate(trainer.args.teachers or ()):
        if f"eval_agreement_teacher_{i}" in metrics["eval"]:
            lines.append(
                f"  teacher {i} {name} (weight {trainer.args.teacher_weights[i]:.3g}): agreement before "
                f"{fmt(metrics['eval_before'].get(f'eval_before_agreement_teacher_{i}'))} after "
                f"{fmt(metrics['eval'][f'eval_agreement_teacher_{i}'])}, KL before "
                f"{fmt(metrics['eval_before'].get(f'eval_before_kd_loss_teacher_{i}'))} after "
                f"{fmt(metrics['eval'].get(f'eval_kd_loss_teacher_{i}'))}"
            )
    for split, c in metrics.get("cross_tokenizer", {}).items():
        lines.append(
            f"  unaligned targets ({split:<5})   {c['unaligned_share']:.2%} ({c['unaligned_targets']} of {c['targets']}: "
            "no teacher position, trained on the labels only)"
        )
    lines.append(f"  {adapters.saved_to(trainer.model, output_dir, 'student')}")
    return "\n".join(lines)
