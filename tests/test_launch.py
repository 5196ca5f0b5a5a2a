"""Distillation across processes: data parallel training on CPU (gloo) gives what one process gives
with the same global batch, and the teacher is placed right under every engine: a frozen replica
under DDP, sharded for inference under FSDP2 and ZeRO-3, never with gradients or optimizer state.

The multi-process runs start this file as their script (`python tests/test_launch.py WORKER ...`, see
the bottom): `accelerate launch` starts several CPU processes only through MPI (its --mpirun_hostfile),
which this machine lacks, so 2-process runs go through torchrun; the 1-process run goes through
`accelerate launch --config_file recipes/accelerate/cpu.yaml`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import ROOT

HERE = Path(__file__).resolve()


def run(command: list[str], **env) -> str:
    """Run a launcher from the repo root; return its output, or fail with it."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def torchrun(*args: str, **env) -> str:
    return run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE), *args],
        **env,
    )


# --- DDP on 2 CPU processes against 1 process ---------------------------------------------------------

# A short run of the tiny recipe. Text is packed into full blocks of max_length, so no micro-batch has
# padding and the split of a batch between processes cannot change the token count.
RUN = ["--max_steps", "4", "--max_train_samples", "120", "--eval_dataset", "null", "--eval_fraction", "0.05",
       "--max_eval_samples", "8", "--max_length", "64", "--logging_steps", "2", "--save_strategy", "'no'",
       "--warmup_steps", "0", "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip


def read_records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def losses(logs: dict) -> dict:
    """The logged losses and agreement, without timings (which differ between processes)."""
    return {k: v for k, v in logs.items() if k.endswith(("loss", "agreement", "grad_norm"))}


def train_logs(record: dict) -> list[dict]:
    return [losses(log) for log in record["logs"] if "kd_loss" in log]


@pytest.mark.slow
def test_two_cpu_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
    """Global batch 8 either way: 1 process x 8 rows, or 2 processes x 2 rows x 2 accumulation steps.
    accelerate's dataloader gives every process the same seeded permutation and deals it out in
    per-process batches round-robin (rank r takes batches r, r + 2, ...), so micro-batches 2k and
    2k+1 of both processes together hold rows 8k..8k+7 of the permutation: one step sees the rows
    the 1-process step sees. The gradient is then the same sum in another order: float32 rounding
    (~1e-7 relative) is the only difference, and AdamW steps of lr 3e-3 keep it far below 1e-5."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    solo = run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu.yaml",
         str(HERE), "train", str(one), *RUN, "--output_dir", str(one / "out"), "--per_device_train_batch_size", "8"],
    )  # fmt: skip
    pair = torchrun(
        "train", str(two), *RUN, "--output_dir", str(two / "out"),
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
    )  # fmt: skip
    (reference,), ranks = read_records(one), read_records(two)
    assert len(ranks) == 2

    # the student trains wrapped in DDP (after the evaluation at start, which must not prevent that)
    assert [r["student"] for r in ranks] == ["DistributedDataParallel"] * 2
    assert losses(ranks[0]["eval_before"]) == losses(ranks[1]["eval_before"]) != {}
    # it trains, and both ranks log the same losses (all reduced across processes)
    assert len(train_logs(ranks[0])) == 2  # steps 2 and 4
    assert train_logs(ranks[0]) == train_logs(ranks[1])
    assert losses(ranks[0]["eval"]) == losses(ranks[1]["eval"]) != {}
    # ... which are the 1-process run's
    for got, want in zip(train_logs(ranks[0]), train_logs(reference), strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key

    # the student is written once, by rank 0, and equals the 1-process student
    assert [r["saves"] for r in ranks] == [1, 0]
    from safetensors.torch import load_file

    got, want = load_file(two / "out" / "model.safetensors"), load_file(one / "out" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    initial = load_file(ROOT / "tiny_models" / "student" / "model.safetensors")
    moved = max((want[name] - initial[name]).abs().max().item() for name in want)
    assert moved > 1e-3, "training moved the weights by far more than the tolerance"

    # the teacher: a frozen replica on each process, never handed to the optimizer, reported once
    for record in [reference, *ranks]:
        assert record["teacher"] == {"trainable": False, "has_grad": False, "in_optimizer": False, "wrapped": False}
    assert "distill: teacher on one process" in solo
    lines = re.findall(
        r"distill: teacher replicated on each of 2 processes: (.+) of parameters per process \((.+) in", pair
    )
    assert len(lines) == 1, pair[-3000:]
    held, full = lines[0]
    assert held == full


# --- the teacher sharded for inference on 2 CPU processes ---------------------------------------------


def test_fsdp2_shards_the_teacher_on_two_cpu_processes(tmp_path):
    """accelerate enables FSDP only for GPU process groups, so the Trainer cannot run FSDP2 on CPU; the
    teacher's sharding is accelerate's FSDP2 preparation, which runs on CPU over gloo, so it runs here.
    Rank 1 starts with zeroed teacher weights, as fsdp_cpu_ram_efficient_loading leaves them."""
    torchrun("shard", "fsdp2", str(tmp_path))
    check_sharded_teacher(read_records(tmp_path))


def test_zero3_shards_the_teacher_on_two_cpu_processes(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is an optional extra (pip install deepspeed)")
    torchrun("shard", "zero3", str(tmp_path))
    check_sharded_teacher(read_records(tmp_path))


def check_sharded_teacher(ranks: list[dict]) -> None:
    assert len(ranks) == 2
    for r in ranks:
        assert r["max_logit_error"] < 1e-5, "the sharded teacher computes what the whole one computes"
        assert r["trainable"] == 0
        # each process holds about half of the weights, before and after a forward (nothing stays gathered)
        assert 0.4 * r["full"] < r["held"] < 0.6 * r["full"]
        assert r["held_after_forward"] == r["held"]
    assert abs(sum(r["held"] for r in ranks) - ranks[0]["full"]) < 0.05 * ranks[0]["full"]


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU-only: accelerate turns FSDP on only for GPU process groups (on CPU the run is plain DDP); "
    "the CPU path is covered by the DDP test above and the teacher's FSDP2 sharding by the CPU test above",
)
def test_fsdp2_recipe_trains_with_a_sharded_teacher_on_gpus(tmp_path):
    n = torch.cuda.device_count()
    output = run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/fsdp.yaml",
         "--num_processes", str(n), str(HERE), "train", str(tmp_path), *RUN, "--output_dir", str(tmp_path / "out"),
         "--use_cpu", "false", "--per_device_train_batch_size", "4"],
    )  # fmt: skip
    assert f"distill: teacher sharded by FSDP2 over {n} processes" in output
    ranks = read_records(tmp_path)
    assert len(ranks) == n and train_logs(ranks[0])
    for record in ranks:
        assert record["teacher"] == {"trainable": False, "has_grad": False, "in_optimizer": False, "wrapped": False}
    assert [r["saves"] for r in ranks] == [1] + [0] * (n - 1)  # all gather the full state dict, rank 0 writes it
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


# --- bf16 on hardware without it ----------------------------------------------------------------------


def test_bf16_without_hardware_support_fails_before_any_work_saying_what_to_do(monkeypatch, tmp_path):
    import distill.config
    from distill.config import DistillConfig

    monkeypatch.setattr(distill.config, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"bf16: true needs bfloat16 support.*no GPU.*use_cpu: true"):
        DistillConfig(output_dir=str(tmp_path), teacher_model_name_or_path="t", bf16=True)
    # on the CPU, asked for explicitly, bf16 is there
    assert DistillConfig(output_dir=str(tmp_path), teacher_model_name_or_path="t", bf16=True, use_cpu=True).bf16


# --- the processes the tests above start ----------------------------------------------------------------


def train_worker(record_dir: str, *overrides: str) -> None:
    """One process of `distill train` on the tiny recipe that also records what it logged, how many
    weight files it wrote, and what became of the student and the teacher."""
    from transformers import modeling_utils

    from distill import train
    from distill.trainer import DistillTrainer

    record, trainers = {"logs": [], "saves": 0}, []

    class Recorded(DistillTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

        def log(self, logs, start_time=None):
            super().log(logs, start_time)
            record["logs"].append(dict(logs))

    def counted_save_file(*args, **kwargs):  # what writes the weight files
        record["saves"] += 1
        return save_file(*args, **kwargs)

    train.DistillTrainer = Recorded
    save_file, modeling_utils.safe_save_file = modeling_utils.safe_save_file, counted_save_file
    metrics = train.run(str(ROOT / "recipes/tiny_cpu.yaml"), list(overrides))
    trainer = trainers[0]
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    teacher = list(trainer.teacher.parameters())
    record["teacher"] = {
        "trainable": any(p.requires_grad for p in teacher),
        "has_grad": any(p.grad is not None for p in teacher),
        "in_optimizer": any(id(p) in optimized for p in teacher),
        "wrapped": isinstance(trainer.teacher, torch.nn.parallel.DistributedDataParallel),
    }
    record["student"] = type(trainer.model_wrapped).__name__  # what the optimizer steps through
    record["eval"], record["eval_before"] = metrics["eval"], metrics["eval_before"]
    rank = int(os.environ.get("RANK", "0"))
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(record))


def shard_worker(engine: str, record_dir: str) -> None:
    """Place a teacher with distill.placement under FSDP2 or ZeRO-3 on this process and record what
    it computes and holds. The accelerator is a stand-in with the fields placement reads: on CPU,
    accelerate builds neither engine's state for the Trainer."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.placement import parameter_bytes, place_teacher, zero3_inference_config

    def model(layers, hidden, seed):
        torch.manual_seed(seed)
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)  # fmt: skip
        return LlamaForCausalLM(config)

    teacher, student = model(3, 64, 0), model(2, 32, 1)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = teacher(input_ids=ids).logits

    if engine == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        dist.init_process_group("gloo")
        if dist.get_rank() != 0:
            with torch.no_grad():
                for p in teacher.parameters():
                    p.zero_()
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
            cpu_ram_efficient_loading=True, state_dict_type="FULL_STATE_DICT",
        )  # fmt: skip
        state = types.SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=None)
        accelerator = types.SimpleNamespace(
            distributed_type=DistributedType.FSDP, is_fsdp2=True, state=state, mixed_precision="no",
            torch_device_mesh=None, is_main_process=dist.get_rank() == 0, device=torch.device("cpu"),
        )  # fmt: skip
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        # the student's config as the Trainer leaves it: batch sizes filled in from the recipe
        config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}  # fmt: skip
        zero3_inference_config(config, 64)  # fails here, not inside deepspeed, if the config is wrong
        plugin = types.SimpleNamespace(zero_stage=3, deepspeed_config=config)
        state = types.SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=plugin)
        accelerator = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, is_fsdp2=False, state=state)

    placed = place_teacher(teacher, student, accelerator)
    held, full = parameter_bytes(placed)
    with torch.no_grad():
        got = placed(input_ids=ids).logits
    record = {
        "max_logit_error": (got - want).abs().max().item(),
        "held": held,
        "full": full,
        "held_after_forward": parameter_bytes(placed)[0],
        "trainable": sum(p.requires_grad for p in placed.parameters()),
    }
    Path(record_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    {"train": train_worker, "shard": shard_worker}[sys.argv[1]](*sys.argv[2:])
