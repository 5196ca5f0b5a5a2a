"""Where the teacher lives under each engine `accelerate launch` can run.

The teacher only runs forward passes, so no engine may treat it as a model in training: it gets no
gradients, no optimizer state and no data-parallel wrapper. What differs is where its weights sit:

=============================  ===============================================================
engine (recipes/accelerate/)   teacher
=============================  ===============================================================
one device, DDP, ZeRO-1/2      a frozen replica on each process's device (they shard only
                               gradients and optimizer state, which a teacher has none of)
FSDP2                          sharded like the student, with the student's layer wrap policy;
                               every unit frees its gathered weights right after its forward
ZeRO-3                         a DeepSpeed engine with a ZeRO-3 inference config derived from
                               the student's: partitioned weights, no optimizer
=============================  ===============================================================

Under FSDP2 and ZeRO-3 every process must call the teacher the same number of times (each call
gathers weights collectively); the trainer does, once per micro-batch on every process.
"""

from __future__ import annotations

import copy

import torch
from accelerate.utils import DistributedType
from accelerate.utils.dataclasses import get_module_class_from_name
from torch import nn

from distill.errors import UserError


def place_teacher(teacher: nn.Module, student: nn.Module, accelerator) -> nn.Module:
    """The frozen ``teacher``, placed for ``accelerator``'s engine (table above). ``student`` is only
    read, for the FSDP2 wrap policy."""
    teacher.eval()
    teacher.requires_grad_(False)
    engine = sharding(accelerator)
    if engine == "fsdp1":
        raise UserError(
            "distill shards the teacher with FSDP2 only; set fsdp_version: 2 in the accelerate config "
            "(recipes/accelerate/fsdp.yaml does)"
        )
    if engine == "fsdp2":
        return _fsdp2_shard(teacher, student, accelerator)
    if engine == "zero3":
        return _zero3_engine(teacher, accelerator)
    return teacher.to(accelerator.device)


def sharding(accelerator) -> str | None:
    """How the engine holds parameters: sharded ("fsdp2", "fsdp1", "zero3") or whole on every process (None)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp2" if accelerator.is_fsdp2 else "fsdp1"
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "zero3"
    return None


def _fsdp2_shard(teacher: nn.Module, student: nn.Module, accelerator) -> nn.Module:
    # accelerate's own FSDP2 preparation, without an optimizer. Its prepare_model(evaluation_mode=True)
    # neither shards nor moves a model under FSDP, which is how TRL's teachers end up on the CPU
    # (trl#2580). This one also broadcasts rank 0's weights when fsdp_cpu_ram_efficient_loading left
    # the other ranks without them.
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = accelerator.state.fsdp_plugin
    # The first model a plugin sees fixes its layer classes; make that the student, as training will.
    plugin.set_auto_wrap_policy(student)
    missing = [n for n in plugin.transformer_cls_names_to_wrap or () if get_module_class_from_name(teacher, n) is None]
    if missing:
        raise UserError(
            f"FSDP2 wraps the student's layers ({', '.join(missing)}) and the teacher has none of them: one wrap "
            "policy covers both models, so under FSDP2 they must share an architecture. Use "
            "recipes/accelerate/zero3.yaml for a cross-architecture pair."
        )
    teacher = fsdp2_prepare_model(accelerator, teacher)
    # accelerate keeps the root and the output head gathered after forward, for the backward that
    # follows; a teacher has no backward, so every unit frees its weights as soon as it has run.
    teacher.set_reshard_after_forward(True)
    return teacher


def zero3_inference_config(train_config: dict, hidden_size: int) -> dict:
    """The DeepSpeed config of a ZeRO-3 inference engine, derived from the student's training config.

    Same ZeRO-3 partitioning, precision and parameter offload, so the teacher is laid out like the
    student; no optimizer, scheduler, gradient clipping or optimizer offload, since it never steps.
    Bucket sizes left "auto" are filled from the teacher's hidden size h as transformers fills them
    for a model it trains: reduce bucket h^2, prefetch bucket 0.9 h^2, and parameters under 10 h
    elements stay gathered.
    """
    config = copy.deepcopy(train_config)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(f"a ZeRO-3 teacher engine needs a ZeRO-3 config, got stage {zero.get('stage')}")
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    zero.pop("offload_optimizer", None)
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    unresolved = sorted(_auto_keys(config))
    if unresolved:
        raise ValueError(
            f"DeepSpeed config values still 'auto' when the teacher is placed: {', '.join(unresolved)}. "
            "The Trainer fills them from the recipe; build the teacher engine after the Trainer's accelerator."
        )
    return config


def _auto_keys(config: dict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield prefix + key


def _zero3_engine(teacher: nn.Module, accelerator) -> nn.Module:
    import deepspeed

    config = zero3_inference_config(accelerator.state.deepspeed_plugin.deepspeed_config, teacher.config.hidden_size)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def parameter_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of parameters held by this process, bytes of all parameters): a replica holds all of
    them, an FSDP2 shard its local DTensor pieces, a ZeRO-3 partition its ``ds_tensor`` plus whatever
    is gathered at the moment (the small parameters ZeRO-3 keeps whole)."""
    from torch.distributed.tensor import DTensor

    held = full = 0
    for p in module.parameters():
        size = p.element_size()
        if hasattr(p, "ds_tensor"):
            held += (p.ds_tensor.numel() + p.data.numel()) * size
            full += p.ds_numel * size
        elif isinstance(p, DTensor):
            held += p.to_local().numel() * size
            full += p.numel() * size
        else:
            held += p.numel() * size
            full += p.numel() * size
    return held, full


def describe(teacher: nn.Module, accelerator, held: int, full: int) -> str:
    """The one line that says where the teacher is and what it costs each process."""
    n = accelerator.num_processes
    engine = sharding(accelerator)
    if engine:
        how = f"sharded by {'FSDP2' if engine == 'fsdp2' else 'ZeRO-3'} over {n} processes"
    else:
        how = f"replicated on each of {n} processes" if n > 1 else "on one process"
    dtype = str(next((p.dtype for p in teacher.parameters()), torch.float32)).removeprefix("torch.")
    return (
        f"distill: teacher {how}: {_size(held)} of parameters per process ({_size(full)} in full, {dtype}), "
        "frozen, no gradients, no optimizer state"
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
