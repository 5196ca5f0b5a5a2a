"""The `distill train` job: recipe -> checked inputs -> data -> models -> DistillTrainer -> saved student.

Everything a user can get wrong is checked in that order, cheapest first, so a bad path, a
mismatched tokenizer or an unusable dataset fails before any model weight is read.
"""

from __future__ import annotations

import copy
import json
import os
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
from distill.trainer import DistillTrainer

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


def run(recipe_path: str, overrides: list[str] | None = None) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    model_args, data_args, config = parse(recipe, ARGUMENTS)
    resume = resume_checkpoint(config)
    config.check_output_dir(resuming=resume is not None)
    quiet_libraries(data_args.dataset, data_args.eval_dataset)
    adapters.check(model_args, config)
    resolve(model_args.model_name_or_path)
    sampled = config.max_new_tokens if config.lmbda > 0 else 0  # on-policy rows: a prompt + the student's sample
    check_max_length(model_args.model_name_or_path, data_args.max_length, "student", sampled)
    if config.teachers:
        return run_several(recipe, config, data_args, model_args, resume, sampled)
    if config.teacher_cache and config.teacher_server:
        raise UserError(
            "teacher_cache and teacher_server are both set, and training reads its targets from one: drop "
            "teacher_server to train from the cache (`distill cache-teacher` is what fills a cache from a server)"
        )
    # With a teacher cache or server no teacher is loaded, or even needs to be on this machine.
    cache = TeacherCache(config.teacher_cache) if config.teacher_cache else None
    server = None
    if config.teacher_server:
        server = TeacherServer.of_recipe(config)
    elif cache is None:
        resolve(config.teacher_model_name_or_path)
        check_max_length(config.teacher_model_name_or_path, data_args.max_length, "teacher", sampled)
    else:
        note = cache.check_teacher(config.teacher_model_name_or_path, config.resolved_teacher_dtype)
        if note and config.process_index == 0:
            print(note, flush=True)

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
    teacher_tokenizer = None  # set when the teacher's tokenizer (live or served) is another one (distill.xtoken)
    if cache is None:  # a served teacher's tokenizer files are read too; its weights need not be here
        load = load_tokenizer if server is None else served_tokenizer
        teacher_tokenizer = load(config.teacher_model_name_or_path)
        if teacher_tokenizer is None or same_tokenizer(tokenizer, teacher_tokenizer):
            teacher_tokenizer = None
        else:
            check_cross_tokenizer(config, tokenizer, teacher_tokenizer)
    elif cache.teacher_space:  # its teacher's tokenizer and cut are the cache's: no teacher needed here
        teacher_tokenizer = cache.teacher_tokenizer()
        check_cross_tokenizer(config, tokenizer, teacher_tokenizer)
    pair = {}
    if teacher_tokenizer is not None:
        cut = (
            cache.teacher_max_length
            if cache is not None
            else teacher_length(config.teacher_model_name_or_path, data_args.max_length)
        )
        pair = {"teacher_tokenizer": teacher_tokenizer, "teacher_max_length": cut}
    teacher_size = None if server is None else check_run(server, config, data_args, model_args, tokenizer, **pair)
    with config.main_process_first(desc="tokenizing"):
        train_data, eval_data = build_datasets(
            data_args, tokenizer, seed=config.seed, prompts_only=config.lmbda == 1, **pair
        )
    cross = vocab_map = None
    if teacher_tokenizer is not None:
        with config.main_process_first(desc="vocabulary map"):  # the others read the map process 0 wrote
            vocab_map = run_vocab_map(config, data_args, tokenizer, teacher_tokenizer)
        cross = coverage(train_data, eval_data)
        if config.process_index == 0:
            print(coverage_line(cross, tokenizer, teacher_tokenizer), flush=True)
    if cache is not None:
        if cache.teacher_space:  # the student's tokenizer is not pinned; each row is found by its teacher tokens
            cache.check(run_identity(config, data_args, None, None, None, teacher_tokenizer, cache.teacher_max_length))
        else:
            cache.check(run_identity(config, data_args, tokenizer, train_data, eval_data))
        train_data, eval_data = cache.attach("train", train_data), cache.attach("eval", eval_data)
    if config.lmbda > 0:
        prompts_of(Collator(tokenizer.pad_token_id)([train_data[0]]))  # on-policy needs prompts: not text data

    student = adapters.load_student(model_args, config)  # with LoRA adapters when use_peft is set
    if config.process_index == 0:
        print(adapters.trainable_parameters(student), flush=True)
    teacher, collator = teacher_source(
        config, model_args, tokenizer, student, model_path=config.teacher_model_name_or_path, cache=cache,
        server=server, size=teacher_size, teacher_tokenizer=teacher_tokenizer, vocab_map=vocab_map,
    )  # fmt: skip

    # The "before" evaluation runs inside train(), once the engine has prepared the student. Called
    # before train(), evaluate() prepares the student for evaluation only: accelerate then never
    # wraps it in DDP (each process would silently train on its own gradients) and FSDP2 refuses a
    # model without its optimizer.
    config.eval_on_start = eval_data is not None and not resume
    trainer = DistillTrainer(
        model=student,
        teacher=teacher,
        args=config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        data_collator=collator,
        student_server=student_server,
    )
    extra = {"cross_tokenizer": cross} if cross else None
    return train_and_save(trainer, recipe, resume, summary, extra)


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


def run_several(recipe: dict, config, data_args, model_args, resume: str | None, sampled: int) -> dict:
    """`distill train` with ``teachers:``: each a model run here (its tokenizer may differ from the
    student's), a cache or a vLLM server, checked in the order of one teacher's, cheapest first; their columns and
    batch keys named ``name@i`` (distill.data.own_keys), one vocabulary map per teacher with another
    tokenizer (``vocab_map_i.safetensors``), one bill line each."""
    if config.use_vllm:
        raise UserError("use_vllm with several teachers is not implemented; sample with generate (use_vllm: false)")
    caches, servers = {}, {}  # teacher index -> its cache; -> (its server, the model it serves)
    for i, entry in enumerate(config.teachers):
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
            servers[i] = (server, name)
        elif (Path(entry) / MANIFEST).is_file():
            if config.lmbda > 0:
                raise UserError(
                    f"teachers: {entry} is a cache, and lmbda > 0 needs teachers that grade the student's own "
                    "samples; list the teacher's model instead"
                )
            caches[i] = TeacherCache(entry)
        else:
            resolve(entry)
            check_max_length(entry, data_args.max_length, f"teacher {entry}", sampled)

    tokenizer = load_tokenizer(model_args.model_name_or_path)
    other = {}  # teacher index -> its tokenizer, where it is not the student's
    for i, entry in enumerate(config.teachers):
        if i in servers:
            teacher_tokenizer = served_tokenizer(servers[i][1])
        elif i in caches:
            if caches[i].teacher_space:  # its targets are on its teacher's tokens, whatever the student's
                other[i] = caches[i].teacher_tokenizer()
                check_cross_tokenizer(config, tokenizer, other[i])
            continue
        else:
            teacher_tokenizer = load_tokenizer(entry)
        if teacher_tokenizer is not None:
            if not same_tokenizer(tokenizer, teacher_tokenizer):
                check_cross_tokenizer(config, tokenizer, teacher_tokenizer)
                other[i] = teacher_tokenizer

    def cut(i: int) -> int:  # where teacher i's side of a row is cut (a teacher-space cache: where it was)
        if i in caches:
            return caches[i].teacher_max_length
        return teacher_length(servers[i][1] if i in servers else config.teachers[i], data_args.max_length)

    # Each teacher with another tokenizer adds its side of every row (the student's side is the same in each).
    build = {"seed": config.seed, "prompts_only": config.lmbda == 1}
    cross, vocab_maps = {}, {}
    with config.main_process_first(desc="tokenizing"):
        if not other:
            train_data, eval_data = build_datasets(data_args, tokenizer, **build)
        for i, teacher_tokenizer in other.items():
            pair = {"teacher_tokenizer": teacher_tokenizer, "teacher_max_length": cut(i)}
            pair_train, pair_eval = build_datasets(data_args, tokenizer, **build, **pair)
            cross[i] = coverage(pair_train, pair_eval)
            pair_train, pair_eval = (
                None if d is None else d.rename_columns({k: keyed(k, i) for k in TEACHER_COLUMNS})
                for d in (pair_train, pair_eval)
            )
            if i == min(other):
                train_data, eval_data = pair_train, pair_eval
            else:
                train_data, eval_data = _with_columns(train_data, eval_data, pair_train, pair_eval, i)
    for i, teacher_tokenizer in other.items():
        with config.main_process_first(desc="vocabulary map"):
            vocab_maps[i] = run_vocab_map(config, data_args, tokenizer, teacher_tokenizer, f"vocab_map_{i}.safetensors")
        if config.process_index == 0:
            print(
                f"distill: teacher {i} ({config.teachers[i]}): "
                + coverage_line(cross[i], tokenizer, teacher_tokenizer).removeprefix("distill: "),
                flush=True,
            )
    sizes = {}
    for i, (server, name) in servers.items():
        pair = {}
        if i in other:
            pair = {"teacher_tokenizer": other[i], "teacher_max_length": cut(i)}
        sizes[i] = check_run(server, as_teacher(config, teacher_model_name_or_path=name), data_args, model_args,
                             tokenizer, **pair)  # fmt: skip
    rows = {"train": train_data, "eval": eval_data}  # before any cache wraps them
    for i, cache in caches.items():
        if cache.teacher_space:
            cache.check(run_identity(config, data_args, None, None, None, other[i], cache.teacher_max_length))
        else:
            cache.check(run_identity(config, data_args, tokenizer, rows["train"], rows["eval"]))
        column, key = keyed("teacher_input_ids", i), keyed("teacher_targets", i)
        train_data = cache.attach("train", train_data, key, column, rows["train"])
        eval_data = cache.attach("eval", eval_data, key, column, rows["eval"])
    if config.lmbda > 0:
        prompts_of(Collator(tokenizer.pad_token_id)([train_data[0]]))

    student = adapters.load_student(model_args, config)
    if config.process_index == 0:
        print(adapters.trainable_parameters(student), flush=True)
    sources, per_teacher = [], []
    for i, entry in enumerate(config.teachers):
        source, collator = teacher_source(
            config, model_args, tokenizer, student, model_path=entry, cache=caches.get(i),
            server=servers[i][0] if i in servers else None, size=sizes.get(i), teacher_tokenizer=other.get(i),
            vocab_map=vocab_maps.get(i),
        )  # fmt: skip
        sources.append(source)
        per_teacher.append(collator)

    config.eval_on_start = eval_data is not None and not resume
    trainer = DistillTrainer(
        model=student,
        teacher=sources,
        args=config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        data_collator=TeachersCollator(Collator(tokenizer.pad_token_id), per_teacher),
    )
    extra = {"cross_tokenizer_teachers": {config.teachers[i]: c for i, c in cross.items()}} if cross else None
    return train_and_save(trainer, recipe, resume, summary, extra)


def teacher_source(config, model_args, tokenizer, student, *, model_path, cache, server, size, teacher_tokenizer,
                   vocab_map):  # fmt: skip
    """One teacher's source of targets (distill.teacher) and the collator of its side of a batch, from what
    the checks found: a vLLM ``server`` (``size``: its model's), a ``cache``, or else the model at
    ``model_path``, loaded here; ``teacher_tokenizer`` and ``vocab_map`` where its tokenizer is not the
    student's. The vocabulary checks run here, once the student is loaded."""
    pad = tokenizer.pad_token_id
    cross = teacher_tokenizer is not None
    collator = Collator(pad, teacher_pad_token_id=teacher_tokenizer.pad_token_id) if cross else Collator(pad)
    mapped = (vocab_map, config.xtoken_loss) if cross else ()
    if server is not None:
        vocab_sizes_fit(tokenizer, student)
        # Asked for one batch ahead, except where they would go unread: on-policy batches are replaced
        # after collation (their targets are asked for when they exist), and alpha 0 reads none in training.
        if config.lmbda == 0 and config.alpha > 0:
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
