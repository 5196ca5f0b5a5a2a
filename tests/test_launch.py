"""Distillation across processes: data parallel training on CPU (gloo) gives what one process gives
with the same global batch, and the teacher is placed right under every engine: a frozen replica
under DDP, sharded for inference under FSDP2 and ZeRO-3, never with gradients or optimizer state.

The launched processes run this file as their script (`python tests/test_launch.py WORKER ...`, see
the bottom). `accelerate launch` starts several CPU processes only through MPI (--mpirun_hostfile),
which this machine lacks, so the 2-process DDP run goes through torchrun; the 1-process reference
goes through `accelerate launch --config_file recipes/accelerate/cpu.yaml`, and the ZeRO-3 run
through `accelerate launch --config_file recipes/accelerate/zero3.yaml` (DeepSpeed runs on CPU).
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.cli import end_process_group

from conftest import ROOT

HERE = Path(__file__).resolve()
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def start(command: list[str], **env) -> subprocess.Popen:
    """Start a launcher from the repo root, output to a pipe."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen) -> str:
    """Its output, once it has exited 0."""
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, failure(output)
    return output


def failure(output: str) -> str:
    """The error lines of every process (a rank's own error is often far above the launcher's), then the end."""
    errors = dict.fromkeys(line for line in output.splitlines() if re.search(r"\w+Error\b", line))
    return "\n".join([*list(errors)[:20], "...", output[-3000:]])


def read_records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def losses(logs: dict) -> dict:
    """The logged losses, agreement and gradient norm, without timings (which differ between processes)."""
    return {k: v for k, v in logs.items() if k.endswith(("loss", "agreement", "grad_norm"))}


def train_logs(record: dict) -> list[dict]:
    return [losses(log) for log in record["logs"] if "kd_loss" in log]


FROZEN = {"trainable": False, "has_grad": False, "in_optimizer": False, "wrapped": False}

# --- data parallel training on 2 CPU processes against 1 process -------------------------------------

# A short run of the tiny recipe. Text is packed into full blocks of max_length, so no micro-batch has
# padding and the split of a batch between processes cannot change the token count. 5 held-out rows
# do not split evenly over 2 processes: accelerate pads the second one's batch with a copied row. Plain SGD makes
# the weights follow the gradients linearly: AdamW would divide out their scale, and would amplify
# float rounding in coordinates whose gradient is ~0 (by up to lr * rounding / eps).
RUN = ["--max_steps", "4", "--max_train_samples", "120", "--eval_dataset", "null", "--eval_fraction", "0.05",
       "--max_eval_samples", "5", "--max_length", "64", "--logging_steps", "2", "--save_strategy", "'no'",
       "--warmup_steps", "0", "--optim", "sgd", "--learning_rate", "0.5", "--report_to", "none",
       "--disable_tqdm", "true"]  # fmt: skip
# Global batch 8 either way: 1 process x 8 rows, or 2 processes x 2 rows x 2 accumulation steps.
ONE = ["--per_device_train_batch_size", "8"]
TWO = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short run as 1 process, as 2 DDP processes and (with deepspeed installed) as 2 ZeRO-3
    processes, started together: {name: (folder, launcher output)}."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("one", "ddp", "zero3")}

    def train(name, *extra):
        return [str(HERE), "train", str(folders[name]), *RUN, "--output_dir", str(folders[name] / "out"), *extra]

    processes = {
        "one": start([*ACCELERATE, "--config_file", "recipes/accelerate/cpu.yaml", *train("one", *ONE)]),
        "ddp": start([*TORCHRUN, *train("ddp", *TWO)]),
    }
    try:
        import deepspeed  # noqa: F401

        # CPU even where a GPU is visible, so that it compares with the CPU reference
        processes["zero3"] = start(
            [*ACCELERATE, "--config_file", "recipes/accelerate/zero3.yaml", "--num_processes", "2",
             "--main_process_port", "0", *train("zero3", *TWO, "--use_cpu", "false", "--ddp_backend", "gloo")],
            CUDA_VISIBLE_DEVICES="",
        )  # fmt: skip
    except ImportError:
        pass
    outputs = {name: (p.communicate(timeout=600)[0], p.returncode) for name, p in processes.items()}
    return {name: (folders[name], *outputs[name]) for name in outputs}


def check_same_training(runs, name: str) -> list[dict]:
    """`name`'s 2-process run logged and saved what the 1-process run did; returns its records."""
    folder, output, returncode = runs[name]
    assert returncode == 0, failure(output)
    (reference,), ranks = read_records(runs["one"][0]), read_records(folder)
    assert len(ranks) == 2

    # the evaluation at start and both ranks' logs agree (all reduced across processes)...
    assert losses(ranks[0]["eval_before"]) == losses(ranks[1]["eval_before"]) != {}
    assert len(train_logs(ranks[0])) == 2  # steps 2 and 4
    assert train_logs(ranks[0]) == train_logs(ranks[1])
    assert losses(ranks[0]["eval"]) == losses(ranks[1]["eval"]) != {}
    # ... and the evaluations are the 1-process run's: the same 5 held-out rows, each counted once
    # (before training the weights are the same, so to float rounding; after, to the weights' 1e-6)
    for key, rel in (("eval_before", 1e-6), ("eval", 1e-5)):
        want = losses(reference[key])
        assert want.keys() == losses(ranks[0][key]).keys()
        for name, value in want.items():
            assert ranks[0][key][name] == pytest.approx(value, rel=rel), (key, name)
    # ... and the training logs are the 1-process run's
    for got, want in zip(train_logs(ranks[0]), train_logs(reference), strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key

    # the student is written once, by rank 0, and equals the 1-process student: the two gradients are
    # the same sum in another order, so they differ by float32 rounding (~1e-8 on the weights after 4
    # steps, measured), against weights that moved by ~0.1
    assert [r["saves"] for r in ranks] == [1, 0]
    got, want = load_file(folder / "out" / "model.safetensors"), load_file(runs["one"][0] / "out" / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    initial = load_file(ROOT / "tiny_models" / "student" / "model.safetensors")
    assert max((want[k] - initial[k]).abs().max().item() for k in want) > 1e-2, "the weights moved"

    # the teacher never trains, whatever the engine
    for record in [reference, *ranks]:
        assert record["teacher"] == FROZEN
    return ranks


@pytest.mark.slow
def test_two_ddp_processes_on_cpu_train_like_one_process_with_the_same_global_batch(runs):
    """accelerate's dataloader gives every process the same seeded permutation and deals it out in
    per-process batches round-robin (rank r takes batches r, r + 2, ...), so micro-batches 2k and
    2k + 1 of both processes together hold rows 8k..8k+7 of the permutation: each step sees the
    rows of the 1-process step."""
    ranks = check_same_training(runs, "ddp")
    # the student trains wrapped in DDP, even after the evaluation at start
    assert [r["student"] for r in ranks] == ["DistributedDataParallel"] * 2
    # the teacher is a replica on each process, reported once
    assert "distill: teacher on one process" in runs["one"][1]
    lines = re.findall(r"distill: teacher replicated on each of 2 processes: (.+) of parameters per process \((.+) in",
                       runs["ddp"][1])  # fmt: skip
    assert len(lines) == 1
    held, full = lines[0]
    assert held == full


# Two teachers of the student's tokenizer (the tiny teacher, and the student's own weights as a second),
# weighted 0.7 / 0.3: each teacher's evaluation and bill are summed over processes like the rest.
SEVERAL = ["--teacher_model_name_or_path", "null", "--teachers", "[tiny_models/teacher, tiny_models/student]",
           "--teacher_weights", "[0.7, 0.3]"]  # fmt: skip


@pytest.mark.slow
def test_several_teachers_on_two_ddp_processes_train_evaluate_and_bill_like_one_process(tmp_path):
    folders = {name: tmp_path / name for name in ("one", "ddp")}

    def train(name, *extra):
        return [str(HERE), "train", str(folders[name]), *RUN, *SEVERAL, "--output_dir", str(folders[name] / "out"),
                *extra]  # fmt: skip

    for folder in folders.values():
        folder.mkdir()
    one = start([*ACCELERATE, "--config_file", "recipes/accelerate/cpu.yaml", *train("one", *ONE)])
    ddp = start([*TORCHRUN, *train("ddp", *TWO)])
    finish(one), finish(ddp)
    (reference,), ranks = read_records(folders["one"]), read_records(folders["ddp"])
    assert len(ranks) == 2
    for key in ("eval_before", "eval"):
        want = {k: v for k, v in reference[key].items() if "_teacher_" in k}
        assert len(want) == 4  # kd_loss and agreement of each teacher
        for rank in ranks:
            for name, value in want.items():
                assert rank[key][name] == pytest.approx(value, rel=1e-5), (key, name)
    for got, want in zip(train_logs(ranks[0]), train_logs(reference), strict=True):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    bills = [json.loads((f / "out" / "cost_report.json").read_text())["teachers"] for f in folders.values()]
    assert [t["flops"] for t in bills[1]] == [t["flops"] for t in bills[0]]
    assert all(t["flops"] > 0 for t in bills[0])


@pytest.mark.slow
def test_two_zero3_processes_on_cpu_train_like_one_process_with_a_sharded_teacher(runs):
    if "zero3" not in runs:
        pytest.skip("deepspeed is an optional extra (pip install deepspeed)")
    ranks = check_same_training(runs, "zero3")
    assert [r["student"] for r in ranks] == ["DeepSpeedEngine"] * 2
    lines = re.findall(r"distill: teacher sharded by ZeRO-3 over 2 processes: (.+) MiB of parameters per process "
                       r"\((.+) MiB in full", runs["zero3"][1])  # fmt: skip
    assert len(lines) == 1
    held, full = map(float, lines[0])
    assert held == pytest.approx(full / 2, rel=0.1)


# --- the teacher sharded for inference, on 2 CPU processes ----------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """One 2-process run that places a teacher under FSDP2, then (with deepspeed) under ZeRO-3."""
    folder = tmp_path_factory.mktemp("sharded")
    finish(start([*TORCHRUN, str(HERE), "shard", str(folder)]))
    return read_records(folder)


def check_sharded(ranks: list[dict]) -> None:
    assert len(ranks) == 2
    for r in ranks:
        assert r["max_logit_error"] < 1e-5, "the sharded teacher computes what the whole one computes"
        assert r["trainable"] == 0
        # each process holds about half of the weights, before and after a forward: nothing stays gathered
        assert 0.4 * r["full"] < r["held"] < 0.6 * r["full"]
        assert r["held_after_forward"] == r["held"]
    assert abs(sum(r["held"] for r in ranks) - ranks[0]["full"]) < 0.05 * ranks[0]["full"]


def test_fsdp2_shards_the_teacher_on_two_cpu_processes(sharded):
    """accelerate turns FSDP on only for GPU process groups, so the Trainer cannot run FSDP2 on CPU; the
    teacher's placement is accelerate's FSDP2 preparation, which runs on CPU over gloo. Rank 1 starts
    with zeroed teacher weights, as fsdp_cpu_ram_efficient_loading leaves them: rank 0's are broadcast."""
    check_sharded([r["fsdp2"] for r in sharded])


def test_zero3_shards_the_teacher_on_two_cpu_processes(sharded):
    if "zero3" not in sharded[0]:
        pytest.skip("deepspeed is an optional extra (pip install deepspeed)")
    check_sharded([r["zero3"] for r in sharded])


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU-only: accelerate turns FSDP on only for GPU process groups (on CPU the run is plain DDP); "
    "the CPU path is covered by the DDP test and the teacher's FSDP2 sharding by the CPU sharding test",
)
def test_fsdp2_recipe_trains_with_a_sharded_teacher_on_gpus(tmp_path):
    n = torch.cuda.device_count()
    output = finish(start(
        [*ACCELERATE, "--config_file", "recipes/accelerate/fsdp.yaml", "--num_processes", str(n), "--main_process_port",
         "0", str(HERE), "train", str(tmp_path), *RUN, "--output_dir", str(tmp_path / "out"), "--use_cpu", "false"],
    ))  # fmt: skip
    assert f"distill: teacher sharded by FSDP2 over {n} processes" in output
    ranks = read_records(tmp_path)
    assert len(ranks) == n and train_logs(ranks[0]) and ranks[0]["eval_before"]
    assert [r["teacher"] for r in ranks] == [FROZEN] * n
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


# --- on-policy sampling from a sharded student, with the cost meter on --------------------------------


def test_on_policy_sampling_of_an_fsdp2_student_on_two_cpu_processes_is_measured_without_deadlock(tmp_path):
    """The trainer's sampling (DistillTrainer._sample) from a student sharded with FSDP2's fully_shard on
    2 gloo processes, synced_gpus on and the meter counting: rank 1's prompts get wider every step
    while rank 0's keep their width, so the ranks meet shapes the meter has and has not counted in
    different steps. Every process finishes (no collective one makes and the other does not), the two
    sample with different seeds, and the measured sampling FLOPs equal, on every rank, the computed
    ones of a prefill plus one decoding forward per further sampled token (distill.flops.sampling_flops)."""
    process = start([*TORCHRUN, str(HERE), "on_policy_fsdp", str(tmp_path)])
    try:
        finish(process)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the two processes did not finish: a collective was left waiting") from None
    ranks = read_records(tmp_path)
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["steps"] == 3 and rank["measured"] == pytest.approx(rank["computed"], rel=1e-9)
        assert rank["measured"] > 0
    assert ranks[0]["seeds"] != ranks[1]["seeds"]
    assert ranks[0]["samples"] != ranks[1]["samples"]


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
    teacher = list(trainer.teacher.model.parameters())
    record["teacher"] = {
        "trainable": any(p.requires_grad for p in teacher),
        "has_grad": any(p.grad is not None for p in teacher),
        "in_optimizer": any(id(p) in optimized for p in teacher),
        "wrapped": isinstance(trainer.teacher.model, torch.nn.parallel.DistributedDataParallel),
    }
    record["student"] = type(trainer.model_wrapped).__name__  # what the optimizer steps through
    record["eval"], record["eval_before"] = metrics["eval"], metrics["eval_before"]
    Path(record_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
    # As `distill train` ends, where no trainer is left: its DDP model holds the process group, whose gloo
    # threads would otherwise outlive destroy_process_group into finalisation (see end_sharded_worker).
    del trainer, teacher
    trainers.clear()
    gc.collect()
    end_process_group()


def shard_worker(record_dir: str) -> None:
    """Place a teacher with distill.placement under FSDP2, then under ZeRO-3 if deepspeed is installed,
    and record what it computes and what this process holds. The accelerator is a stand-in with the
    fields placement reads: on CPU, accelerate builds no FSDP state for a Trainer to hand over."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.placement import parameter_bytes, place_teacher

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def model(layers, hidden, seed):
        torch.manual_seed(seed)
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)  # fmt: skip
        return LlamaForCausalLM(config)

    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))

    def place(accelerator, zero_other_ranks=False):
        teacher, student = model(3, 64, 0), model(2, 32, 1)
        with torch.no_grad():
            want = teacher(input_ids=ids).logits
            if zero_other_ranks and rank != 0:
                for p in teacher.parameters():
                    p.zero_()
        placed = place_teacher(teacher, student, accelerator)
        held, full = parameter_bytes(placed)
        with torch.no_grad():
            got = placed(input_ids=ids).logits
        return {
            "max_logit_error": (got - want).abs().max().item(),
            "held": held,
            "full": full,
            "held_after_forward": parameter_bytes(placed)[0],
            "trainable": sum(p.requires_grad for p in placed.parameters()),
        }

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        cpu_ram_efficient_loading=True, state_dict_type="FULL_STATE_DICT",
    )  # fmt: skip
    fsdp = types.SimpleNamespace(
        distributed_type=DistributedType.FSDP, is_fsdp2=True, mixed_precision="no", torch_device_mesh=None,
        is_main_process=rank == 0, device=torch.device("cpu"),
        state=types.SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=None),
    )  # fmt: skip
    record = {"fsdp2": place(fsdp, zero_other_ranks=True)}
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # joins the process group above
        # the student's config as the Trainer leaves it: batch sizes filled in from the recipe
        config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}  # fmt: skip
        plugin = types.SimpleNamespace(zero_stage=3, deepspeed_config=config)
        zero3 = types.SimpleNamespace(
            distributed_type=DistributedType.DEEPSPEED, is_fsdp2=False,
            state=types.SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=plugin),
        )  # fmt: skip
        record["zero3"] = place(zero3)
    except ImportError:
        pass
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(record))
    end_sharded_worker()


def on_policy_fsdp_worker(record_dir: str) -> None:
    """Sample 3 on-policy batches through DistillTrainer._sample from an FSDP2-sharded tiny student,
    with a CostCallback measuring; record the seeds, samples and measured vs computed FLOPs. The
    trainer is a stand-in carrying what _sample reads: accelerate turns FSDP on only for GPU
    process groups, so a real Trainer cannot shard on CPU."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from distill.cost import CostCallback
    from distill.flops import model_size, sampling_flops
    from distill.models import load_model, load_tokenizer
    from distill.on_policy import step_seed
    from distill.trainer import DistillTrainer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    student = load_model(str(ROOT / "tiny_models/student"))
    mesh = init_device_mesh("cpu", (2,))
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    tokenizer = load_tokenizer(str(ROOT / "tiny_models/student"))
    student.generation_config.eos_token_id = None  # every sample runs max_new_tokens: the widths decide
    cost = CostCallback()
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.FSDP, is_fsdp2=True, num_processes=2, process_index=rank,
        unwrap_model=lambda model: model,
    )  # fmt: skip
    args = types.SimpleNamespace(use_vllm=False, max_new_tokens=5, generation_temperature=1.0, top_p=1.0)
    trainer = types.SimpleNamespace(
        args=args, accelerator=accelerator, model=student, cost=cost, processing_class=_NoEos(tokenizer)
    )
    record = {"seeds": [], "samples": [], "steps": 0}
    for step in range(3):
        width = 6 + (step if rank == 1 else 0)
        ids = torch.arange(3, 3 + 2 * width).reshape(2, width)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]  # the last token is the target: everything before it the prompt
        seed = step_seed(0, step, 0, 1, rank)
        sampled = DistillTrainer._sample(trainer, {"input_ids": ids, "labels": labels}, seed)
        record["seeds"].append(seed)
        record["samples"].append(sampled["input_ids"].tolist())
        record["steps"] += 1
    record["measured"] = cost.meter.flops["generation"]
    size = model_size(str(ROOT / "tiny_models/student"))
    prompts = [6 + (step if rank == 1 else 0) - 1 for step in range(3)]  # 2 rows each
    record["computed"] = sum(2 * sampling_flops(size, width, args.max_new_tokens) for width in prompts)
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(record))
    end_sharded_worker()


def end_sharded_worker() -> None:
    """Leave a worker that sharded a model with FSDP2, once its record is written, without the
    interpreter's finalisation.

    FSDP2's DeviceMesh stays referenced from DTensor's sharding cache (not Python-visible, so neither
    gc nor clearing the Python-side caches frees it), and the mesh holds the gloo group: its worker
    threads outlive destroy_process_group (the same 3 extra threads before and after it, where an
    unsharded worker has none left). A gloo thread that drops a tensor while the interpreter
    finalises takes the GIL and is killed, "terminate called without an active exception"
    (pytorch#190489): 1 abort in 54 shard runs under load here, twice in CI, each time after both
    records had been written. Nothing is left to flush but the standard streams."""
    end_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _NoEos:
    """A tokenizer without an EOS id: samples end at max_new_tokens only."""

    def __init__(self, tokenizer):
        self.pad_token_id, self.eos_token_id = tokenizer.pad_token_id, None


if __name__ == "__main__":
    {"train": train_worker, "shard": shard_worker, "on_policy_fsdp": on_policy_fsdp_worker}[sys.argv[1]](*sys.argv[2:])
