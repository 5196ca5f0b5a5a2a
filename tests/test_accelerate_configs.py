"""The launcher configs in recipes/accelerate/ load with accelerate's own loader, name only settings
accelerate knows, carry no training hyperparameters, and hand the training processes the engine
they promise, under which the teacher is placed as distill.placement says."""

import types

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from transformers import LlamaConfig, LlamaForCausalLM

from distill.placement import sharding, zero3_inference_config

from conftest import ROOT

CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
# What each config is for: its engine, and where the teacher goes under it.
EXPECTED = {
    "cpu.yaml": (DistributedType.MULTI_CPU, None),
    "single_gpu.yaml": (DistributedType.NO, None),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, None),
    "fsdp.yaml": (DistributedType.FSDP, "fsdp2"),
    "zero2.yaml": (DistributedType.DEEPSPEED, None),
    "zero3.yaml": (DistributedType.DEEPSPEED, "zero3"),
}
# Settings that belong to the recipe (TrainingArguments), never to the launcher.
TRAINING_KEYS = {"gradient_accumulation_steps", "gradient_clipping", "deepspeed_config_file"}


def launcher_env(path) -> dict:
    """The environment `accelerate launch --config_file path` gives its training processes (the launch
    command's own dispatch, without starting them)."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "scripts/distill.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        env = prepare_simple_launcher_cmd_env(args)[1]
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def in_env(monkeypatch, env: dict) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def tiny_student():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    return LlamaForCausalLM(config)


def test_there_is_one_config_per_engine():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_with_accelerates_loader_and_opens_with_its_command(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# accelerate launch --config_file recipes/accelerate/" + path.name)
    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert config.distributed_type == EXPECTED[path.name][0]
    assert yaml.safe_load(path.read_text())["mixed_precision"] == "no", "precision belongs to the recipe (bf16: true)"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_names_only_launch_settings_and_no_training_hyperparameters(path):
    """accelerate silently drops unknown keys inside fsdp_config / deepspeed_config; here each must be
    an argument of `accelerate launch`, where the launcher reads it from."""
    launch_args = {a.dest for a in launch_command_parser()._actions}
    config = yaml.safe_load(path.read_text())
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in config.get("fsdp_config", {})]
    nested += list(config.get("deepspeed_config", {}))
    assert [k for k in nested if k not in launch_args] == []
    assert TRAINING_KEYS.isdisjoint(nested)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_setting_carries_a_comment(path):
    settings = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert [line for line in settings if not line.rstrip().endswith(":") and "#" not in line] == []


def test_fsdp_config_gives_fsdp2_full_shard_wrapping_each_decoder_layer(monkeypatch):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    in_env(monkeypatch, launcher_env(ROOT / "recipes/accelerate/fsdp.yaml"))
    plugin = FullyShardedDataParallelPlugin()  # what the training processes build from that environment
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard
    assert plugin.cpu_ram_efficient_loading is True
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
    student = tiny_student()
    plugin.set_auto_wrap_policy(student)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, student)
    wrapped = [m for m in student.modules() if policy(m)]
    assert wrapped == list(student.model.layers)


@pytest.mark.parametrize(("name", "stage"), [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_deepspeed_configs_give_their_zero_stage(monkeypatch, name, stage):
    in_env(monkeypatch, launcher_env(ROOT / "recipes/accelerate" / name))
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    assert plugin.zero3_init_flag is (stage == 3)  # ZeRO-3 loads models straight into partitions
    if stage == 3:  # and gathers them into one ordinary checkpoint when the student is saved
        assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_teacher_is_sharded_exactly_where_the_engine_shards_parameters(monkeypatch, path):
    """DDP and ZeRO-1/2 replicate the teacher; FSDP2 and ZeRO-3 shard it."""
    in_env(monkeypatch, launcher_env(path))
    distributed_type = load_config_from_file(str(path)).distributed_type
    fsdp = FullyShardedDataParallelPlugin() if distributed_type == DistributedType.FSDP else None
    deepspeed = DeepSpeedPlugin() if distributed_type == DistributedType.DEEPSPEED else None
    accelerator = types.SimpleNamespace(
        distributed_type=distributed_type,
        is_fsdp2=fsdp is not None and fsdp.fsdp_version == 2,
        state=types.SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed),
    )
    assert sharding(accelerator) == EXPECTED[path.name][1]


def zero3_training_config(monkeypatch) -> dict:
    """The student's DeepSpeed config under zero3.yaml in bf16, with the batch sizes the Trainer fills
    in from the recipe (here one process, micro-batch 2, no accumulation)."""
    in_env(monkeypatch, launcher_env(ROOT / "recipes/accelerate/zero3.yaml"))
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision("bf16")
    config = plugin.deepspeed_config
    config.update(
        train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, gradient_clipping=1.0
    )
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    config["zero_optimization"]["stage3_prefetch_bucket_size"] = "auto"
    return config


def test_zero3_teacher_config_keeps_the_partitioning_and_drops_what_only_training_needs(monkeypatch):
    train_config = zero3_training_config(monkeypatch)
    before = yaml.safe_dump(train_config)
    config = zero3_inference_config(train_config, hidden_size=64)
    assert yaml.safe_dump(train_config) == before, "the student's config must not change"
    assert config["zero_optimization"]["stage"] == 3
    assert config["bf16"] == {"enabled": True}
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        assert key not in config
    assert "offload_optimizer" not in config["zero_optimization"]
    assert config["zero_optimization"]["offload_param"] == train_config["zero_optimization"]["offload_param"]
    # "auto" bucket sizes come from the teacher's hidden size, as transformers fills them for a student
    assert config["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * 64


def test_zero3_teacher_config_refuses_values_the_trainer_has_not_filled_yet(monkeypatch):
    in_env(monkeypatch, launcher_env(ROOT / "recipes/accelerate/zero3.yaml"))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        zero3_inference_config(DeepSpeedPlugin().deepspeed_config, hidden_size=64)


def test_zero3_teacher_config_is_accepted_by_deepspeed(monkeypatch):
    deepspeed_config = pytest.importorskip(
        "deepspeed.runtime.config", reason="deepspeed is an optional extra (pip install deepspeed)"
    )
    config = deepspeed_config.DeepSpeedConfig(zero3_inference_config(zero3_training_config(monkeypatch), 64))
    assert config.zero_optimization_stage == 3
    assert config.optimizer_name is None
