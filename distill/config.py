"""What a recipe can say: three dataclasses that `HfArgumentParser` fills from one flat YAML file.

- `ModelArguments`: the student (or the model to fine-tune) and how to load it.
- `DataArguments`: where the data is and how it becomes token ids.
- `DistillConfig`: `transformers.TrainingArguments` plus what distillation adds (teacher, alpha, T, ...).
- `FinetuneConfig`: `transformers.TrainingArguments` for `distill finetune`.

Both training configs carry `RunArguments`: the settings of the cost meter and `overwrite_output_dir`.

Every field carries its help text; `__post_init__` checks what a user can get wrong, so a bad
recipe fails when it is parsed, the first step of a job, rather than after the models have loaded.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available

from distill.errors import UserError
from distill.hidden import LOSS_TYPES as HIDDEN_LOSS_TYPES
from distill.hidden import parse_layer_map
from distill.losses import LOSS_TYPES, XTOKEN_METHODS

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_bf16_hardware() -> None:
    """`bf16: true` on a device without bfloat16 fails, with what this machine has and what to set instead."""
    if is_torch_bf16_gpu_available():
        return
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        found = (
            f"a {torch.cuda.get_device_name()} (compute capability {major}.{minor}; bf16 needs 8.0+, Ampere or newer)"
        )
        fix = "set fp16: true instead (the teacher then runs in float16), or drop bf16 to train in float32"
    else:
        found = "no GPU"
        fix = (
            "run on a GPU with bf16 (A100, H100, L4, RTX 30xx or newer), set use_cpu: true to train in bf16 on "
            "the CPU (slow), or drop bf16 to train in float32"
        )
    raise UserError(f"bf16: true needs bfloat16 support and this machine has {found}: {fix}")


def check_teachers(config) -> list[float]:
    """The ``teachers`` / ``teacher_weights`` keys of a recipe, checked; the weights divided by their sum."""
    teachers, weights = config.teachers, config.teacher_weights
    if not teachers:
        raise UserError("teacher_weights is set but teachers is not: list the teachers the weights are for")
    single = [k for k in ("teacher_model_name_or_path", "teacher_cache", "teacher_server") if getattr(config, k)]
    if single:
        raise UserError(
            f"teachers and {single[0]} are both set: list every teacher under teachers (a model or a cache "
            f"directory each), or give one with {single[0]} and drop teachers"
        )
    served = [t for t in teachers if t.startswith(("http://", "https://"))]
    if served:
        raise UserError(
            f"teachers: {served[0]} is a server, and a served teacher among several is not implemented; fill a cache "
            "from it (`distill cache-teacher` with teacher_server and teacher_cache) and list the cache's directory"
        )
    if weights is None:
        weights = [1.0] * len(teachers)
    if len(weights) != len(teachers):
        raise UserError(
            f"teacher_weights has {len(weights)} weight(s) for {len(teachers)} teachers: give one per teacher, in "
            "the order of teachers (or none, for equal weights)"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"teacher_weights must be >= 0 with a sum > 0, got {weights}")
    if config.hidden_loss_weight > 0:
        raise UserError(
            "hidden_loss_weight > 0 pairs the student's layers with one teacher's: give that teacher alone "
            "(teacher_model_name_or_path), or set hidden_loss_weight: 0"
        )
    return [w / sum(weights) for w in weights]


def _check_dtype(name: str, value: str) -> None:
    if value not in DTYPES:
        raise UserError(f"{name}={value!r} is not a dtype distill knows; use one of {', '.join(DTYPES)}")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The student (the model that trains): a hub id or a local directory saved with "
            "save_pretrained. A .gguf file can only be a teacher."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype the weights are loaded in: auto, float32, bfloat16 or float16. Keep float32 "
            "weights and set `bf16: true` for mixed-precision training."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel for student and teacher: sdpa, eager or flash_attention_2 "
            "(None lets transformers choose)."
        },
    )
    # Adapters, named like TRL's ModelConfig; turned into a peft.LoraConfig by distill.adapters.
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters instead of every weight: the base stays frozen and the output folder "
            "holds only the adapter (PEFT format; `distill merge` folds it into a full model)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank: inner size of the low-rank update B @ A."})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scale numerator: the update is (lora_alpha / lora_r) * B @ A."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Modules that get adapters, by name suffix (q_proj, v_proj, c_attn, ...), or all-linear: every "
            "linear (and GPT-2 Conv1D) layer except the output head."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter, e.g. embed_tokens lm_head when new "
            "tokens were added."
        },
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: LoRA on the weight's direction plus a trained magnitude vector (PEFT's use_dora)."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: load the frozen base in 4-bit NF4 through bitsandbytes (needs a CUDA GPU, "
            "bitsandbytes and use_peft); `dtype` is the compute dtype."
        },
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise UserError("model_name_or_path is required: the hub id or local path of the student model")
        if self.model_name_or_path.endswith(".gguf"):
            # transformers marks GGUF-loaded models as quantized and Trainer refuses to train those.
            raise UserError(
                f"model_name_or_path={self.model_name_or_path} is a GGUF file, which cannot be trained; load it "
                "once with AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) and save_pretrained it"
            )
        _check_dtype("dtype", self.dtype)
        if isinstance(self.lora_target_modules, str):  # `lora_target_modules: q_proj` in YAML
            self.lora_target_modules = [self.lora_target_modules]
        if isinstance(self.lora_modules_to_save, str):
            self.lora_modules_to_save = [self.lora_modules_to_save]
        if self.lora_r <= 0:
            raise UserError(f"lora_r must be a positive integer (the adapter rank), got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise UserError(f"lora_alpha must be > 0 (the scale is lora_alpha / lora_r), got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise UserError("lora_target_modules is empty: name the modules to adapt, or use all-linear")
        if "all-linear" in self.lora_target_modules and len(self.lora_target_modules) > 1:
            raise UserError(
                f"lora_target_modules {self.lora_target_modules}: all-linear stands alone; to train other modules "
                "in full (embeddings, head), list them in lora_modules_to_save"
            )
        for name in ("use_dora", "load_in_4bit"):
            if getattr(self, name) and not self.use_peft:
                raise UserError(f"{name}: true only applies to LoRA adapters; set use_peft: true as well")


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a local .jsonl/.json/.csv/.parquet/.txt file, a directory of them, or a "
            "hub dataset name. The format is read off its columns: `messages` (chat), `prompt` + "
            "`completion`, or `text` (packed into blocks of max_length)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name, if any."})
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset` to train on."})
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out data, same forms as `dataset`. Unset: `eval_fraction` of `dataset` is held out."},
    )
    eval_split: str = field(default="train", metadata={"help": "Split of `eval_dataset` to evaluate on."})
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Fraction of `dataset` held out for evaluation when `eval_dataset` is unset (0 disables)."},
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Tokens per example: text is packed into blocks of this size, other rows truncated to it."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows (before packing); for quick runs."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many evaluation rows (before packing)."}
    )

    def __post_init__(self):
        if not self.dataset:
            raise UserError("dataset is required: a local data file/directory or a hub dataset name")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 2:
            raise UserError(f"max_length must be at least 2 tokens, got {self.max_length}")


@dataclass
class RunArguments:
    """What `distill train` and `distill finetune` add to TrainingArguments alike: the cost meter's
    settings (distill.cost.CostCallback) and what may happen to an existing output_dir. A mixin: list
    it before TrainingArguments, whose `__post_init__` its own hands on to."""

    measure_cost: bool = field(
        default=True,
        metadata={
            "help": "Measure the training FLOPs (student forward + backward, teacher forward) once per input "
            "shape, log them with MFU, "
            "keep the count across resumes and write cost_report.json. Off only if counting fails (torch_compile)."
        },
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={
            "help": "Dense bf16/fp16 peak TFLOP/s of one device, for MFU. Unset: looked up from the GPU's name "
            "(distill.cost.PEAK_TFLOPS); no MFU on CPU."
        },
    )
    gpu_hour_price: float | None = field(
        default=None, metadata={"help": "$ per device-hour, for the dollar figure of cost_report.json."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow a new run into an output_dir that already holds a finished model, adapter or "
            "metrics.json, replacing them. Unset, such a run is refused (resume_from_checkpoint continues one)."
        },
    )

    def __post_init__(self):
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise UserError(f"peak_tflops must be > 0 (TFLOP/s of one device), got {self.peak_tflops}")
        if self.gpu_hour_price is not None and self.gpu_hour_price < 0:
            raise UserError(f"gpu_hour_price must be >= 0 ($ per device-hour), got {self.gpu_hour_price}")
        # TrainingArguments checks none of these. The batch sizes would fail as a traceback from the
        # DataLoader once the models have loaded; the Trainer divides by gradient_accumulation_steps
        # (ZeroDivisionError at 0), and a negative count trains nothing.
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"{name} must be a whole number >= 1 (sequences per device in each forward pass), "
                    f"got {getattr(self, name)}"
                )
        if self.gradient_accumulation_steps < 1:
            raise UserError(
                f"gradient_accumulation_steps must be a whole number >= 1 (micro-batches per optimizer step), "
                f"got {self.gradient_accumulation_steps}"
            )
        super().__post_init__()

    def check_output_dir(self, resuming: bool) -> None:
        """Refuse an output_dir this run could not write, or whose finished run it would overwrite.
        A job calls it before loading models; a TrainingArguments made in code is not checked."""
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"output_dir {out} is a file, not a directory: give a folder path for the run's outputs")
        finished = _finished_run(out)
        if finished and not (resuming or self.overwrite_output_dir):
            raise UserError(
                f"output_dir {out} already holds a finished run ({finished}): choose another output_dir, "
                "set overwrite_output_dir: true to replace it, or resume_from_checkpoint: true to continue it"
            )
        _check_writable(out)


def _finished_run(out: Path) -> str | None:
    """What in ``out`` says a run finished there: its saved model, adapter or metrics."""
    if (out / "config.json").is_file() and any(out.glob("model*.safetensors*")):
        return "config.json and model weights"
    for name in ("adapter_config.json", "metrics.json"):
        if (out / name).is_file():
            return name
    return None


def _check_writable(out: Path) -> None:
    """Create and remove a file where the run will write. Permission bits alone do not say it (root
    ignores them; read-only mounts and /proc refuse anyway), and the failure would otherwise come at
    the first checkpoint, after the models have loaded and trained."""
    where = out
    while not where.exists():  # output_dir itself is made later, by the Trainer
        if where.parent == where:
            break
        where = where.parent
    if not where.is_dir():
        raise UserError(f"output_dir {out}: {where} is a file, so the folder cannot be made there; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".distill-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserError(
            f"output_dir {out} is not writable (creating a file in {where} failed: {err.strerror or err}); "
            "choose a directory you can write to"
        ) from err


@dataclass
class FinetuneConfig(RunArguments, TrainingArguments):
    """`TrainingArguments` plus `RunArguments`: fine-tuning has no knobs of its own."""


@dataclass
class DistillConfig(RunArguments, TrainingArguments):
    """`TrainingArguments` plus the distillation knobs. Loss: alpha * T^2 * D(teacher, student) + (1 - alpha) * CE
    + hidden_loss_weight * hidden (distill.hidden)."""

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The teacher: a hub id, a local directory or a .gguf file. Its tokenizer may differ from the "
            "student's (another model family): each row is then tokenised by both, positions are aligned by "
            "byte offsets of the text and vocabularies mapped (distill.xtoken; see xtoken_loss)."
        },
    )
    teachers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Several teachers at once, instead of teacher_model_name_or_path / teacher_cache: each a hub id, "
            "a local directory or a .gguf file (run here; its tokenizer may differ from the student's), or a "
            "directory `distill cache-teacher` wrote (it has a manifest.json). The KD term is sum_i w_i KD_i over "
            "them with teacher_weights; each has its own bill line in cost_report.json."
        },
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight >= 0 per entry of teachers, in order (they are divided by their sum); unset: equal."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype the teacher is loaded and run in. auto: bfloat16 when training in bf16, float16 "
            "in fp16, else float32. The teacher never trains, so it needs no fp32 master weights."
        },
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the KD term in [0, 1]: 1 = soft teacher targets only, 0 = labels only."},
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Softmax temperature T > 0 applied to teacher and student logits in the KD term; the term "
            "is scaled by T^2 so its gradient keeps its size as T changes."
        },
    )
    loss_type: str = field(
        default="forward_kl",
        metadata={
            "help": "Divergence: forward_kl = KL(teacher || student), mode-covering; reverse_kl = "
            "KL(student || teacher), mode-seeking; jsd = generalized Jensen-Shannon with `beta`."
        },
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "For loss_type=jsd, the teacher's weight in the mixture M = beta p_T + (1 - beta) p_S; "
            "beta=0 is forward KL, beta=1 reverse KL."
        },
    )
    xtoken_loss: str = field(
        default="projected",
        metadata={
            "help": "Loss against a teacher whose tokenizer differs from the student's (ignored otherwise): "
            "projected = the student's distribution pushed into the teacher's vocabulary by the vocabulary map, "
            "then loss_type on the teacher's teacher_top_k ids + the rest (X-Token's projection); uld = sorted L1 "
            "between the two distributions, blind to ids (ULD); hybrid = loss_type on the exactly matching tokens "
            "+ sorted L1 on the rest (GOLD). Default projected: on the tiny pair (benchmarks/xtoken.py, 150 steps, alpha "
            "0.5) the best held-out perplexity of the three (3.55 vs hybrid 3.93, uld 4.76; labels only 3.52) with "
            "agreement 0.759 (hybrid 0.773, uld 0.576, labels only 0.745)."
        },
    )
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the loss from both models' final hidden states a chunk of tokens at a time "
            "(distill.chunked): same value and gradients, without ever holding the full logits, the "
            "largest tensors of a KD step. Used where the models allow it (plain lm_head, no logit "
            "softcapping or scaling, not under FSDP or ZeRO-3); false: the reference path through the logits."
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Directory of top-k teacher targets. `distill cache-teacher RECIPE` writes it (running the "
            "teacher once); `distill train` then reads it and loads no teacher model. A cache built for "
            "another tokenizer, dataset, max_length, k or temperature is refused."
        },
    )
    teacher_top_k: int = field(
        default=64,
        metadata={
            "help": "How many of the teacher's most likely token ids a cache or a server gives per position (the "
            "rest of its probability mass is kept as one number), and a live teacher with another tokenizer "
            "(xtoken_loss). Larger k: closer to the full loss, more disk or network."
        },
    )
    teacher_server: str | None = field(
        default=None,
        metadata={
            "help": "URL of a vLLM server running the teacher (`vllm serve TEACHER --max-logprobs K`, e.g. "
            "http://127.0.0.1:8000): training loads no teacher and asks the server for each batch's top-k "
            "targets, one batch ahead; `distill cache-teacher` fills a cache from it. teacher_model_name_or_path "
            "names the model it must serve. Needs temperature: 1 (vLLM's log-probabilities are at T = 1)."
        },
    )
    teacher_server_timeout: float = field(
        default=60.0,
        metadata={"help": "Seconds one request to teacher_server may take before it counts as failed and is retried."},
    )
    teacher_server_batch_size: int = field(
        default=8, metadata={"help": "Sequences per request to teacher_server (up to four requests run at once)."}
    )
    teacher_server_retries: int = field(
        default=5,
        metadata={
            "help": "Retries of a failed request to teacher_server, 1, 2, 4, ... seconds apart, before the run "
            "stops (resumable from its last checkpoint)."
        },
    )
    hidden_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the hidden-state term (distill.hidden): the loss becomes alpha * KD + (1 - alpha) * CE "
            "+ hidden_loss_weight * hidden, where hidden compares the outputs of the student's layers with the "
            "teacher layers hidden_layer_map pairs them with, on the target tokens. 0 = off. Needs the teacher "
            "model in this process (not teacher_cache or teacher_server, which give no hidden states)."
        },
    )
    hidden_loss_type: str = field(
        default="mse",
        metadata={
            "help": "The hidden-state term per token: mse = mean squared difference over the teacher's channels; "
            "cosine = 1 - cosine similarity. A learned projection (student width -> teacher width) comes in when "
            "the widths differ."
        },
    )
    hidden_layer_map: str | None = field(
        default=None,
        metadata={
            "help": 'Which layers the hidden-state term pairs, "student_layer:teacher_layer,..." (e.g. "0:0,1:5,2:11", '
            "indices from 0). Unset: the layer_map of the student folder's prune_report.json (`distill prune`)."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: distill's collator already builds exactly the columns the models take."},
    )
    # On-policy distillation (distill.on_policy), named like TRL's GKDConfig.
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of training micro-batches whose completions the student writes itself (on-policy, "
            "GKD's lambda): the student samples a completion for each prompt and the teacher grades every token "
            "of it. 0 = off-policy (the data's completions), 1 = fully on-policy. Needs prompt/completion or "
            "messages data."
        },
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "On-policy: longest completion the student samples, in tokens."}
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={"help": "On-policy: temperature of the student's sampling (not the KD temperature)."},
    )
    top_p: float = field(default=1.0, metadata={"help": "On-policy: nucleus sampling's p, in (0, 1]; 1 = off."})
    generation_seed: int | None = field(
        default=None,
        metadata={
            "help": "On-policy: seed of which micro-batches are on-policy and of every sample, with the step and "
            "micro-batch (so a resumed run samples what an uninterrupted one does). Unset: `seed`."
        },
    )

    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "On-policy: sample the student's completions on a vLLM server serving the student (vllm_server) "
            "instead of with transformers' generate. The student's weights are pushed to it every vllm_sync_steps "
            "optimizer steps. Not with use_peft, FSDP or ZeRO-3."
        },
    )
    vllm_server: str | None = field(
        default=None,
        metadata={
            "help": "use_vllm: URL of the vLLM server serving the student, started with VLLM_SERVER_DEV_MODE=1 (its "
            "/collective_rpc reloads the pushed weights; README, On-policy distillation)."
        },
    )
    vllm_sync_steps: int = field(
        default=1,
        metadata={
            "help": "use_vllm: push the student's weights to the server every this many optimizer steps (1: the "
            "samples always come from the current student). vLLM batches concurrent requests as they come, so its "
            "samples are not bitwise reproducible, and neither is a resumed run's sampling."
        },
    )
    vllm_weights_dir: str | None = field(
        default=None,
        metadata={
            "help": "use_vllm: folder the pushed weights are written to; the server must read it (this machine, or "
            "a shared file system). Unset: OUTPUT_DIR/vllm_weights, deleted at the end of training."
        },
    )

    def __post_init__(self):
        # Validate before TrainingArguments.__post_init__, which may already touch devices.
        if self.teachers is not None or self.teacher_weights is not None:
            self.teacher_weights = check_teachers(self)
        elif not self.teacher_model_name_or_path and not self.teacher_cache:
            raise UserError(
                "teacher_model_name_or_path is required (the hub id or local path of the teacher), "
                "or teacher_cache: a directory written by `distill cache-teacher`"
            )
        if self.teacher_server_timeout <= 0:
            raise UserError(f"teacher_server_timeout must be > 0 seconds, got {self.teacher_server_timeout}")
        if self.teacher_server_batch_size < 1:
            raise UserError(f"teacher_server_batch_size must be >= 1, got {self.teacher_server_batch_size}")
        if self.teacher_server_retries < 0:
            raise UserError(f"teacher_server_retries must be >= 0, got {self.teacher_server_retries}")
        if self.teacher_server and not self.teacher_model_name_or_path:
            raise UserError(
                "teacher_server needs teacher_model_name_or_path: the model the server must be serving (its "
                "config gives the vocabulary and the FLOPs of the positions it scores)"
            )
        if self.teacher_server and self.temperature != 1.0:
            raise UserError(
                f"teacher_server gives log-probabilities at temperature 1 only (vLLM's prompt log-probabilities are "
                f"the raw log-softmax, and top-k targets cannot be re-tempered), and this recipe has temperature: "
                f"{self.temperature}. Set temperature: 1.0, or cache the targets from a local teacher with "
                "`distill cache-teacher` (teacher_cache), which keeps them at any temperature"
            )
        if self.teacher_top_k < 1:
            raise UserError(f"teacher_top_k must be >= 1, got {self.teacher_top_k}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1] (weight of the KD term), got {self.alpha}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"unknown loss_type {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if self.xtoken_loss not in XTOKEN_METHODS:
            raise UserError(f"unknown xtoken_loss {self.xtoken_loss!r}; choose one of {', '.join(XTOKEN_METHODS)}")
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"beta must be in [0, 1], got {self.beta}")
        _check_dtype("teacher_dtype", self.teacher_dtype)
        if not self.hidden_loss_weight >= 0:
            raise UserError(f"hidden_loss_weight must be >= 0 (0 = off), got {self.hidden_loss_weight}")
        if self.hidden_loss_type not in HIDDEN_LOSS_TYPES:
            raise UserError(
                f"unknown hidden_loss_type {self.hidden_loss_type!r}; choose one of {', '.join(HIDDEN_LOSS_TYPES)}"
            )
        if self.hidden_layer_map is not None:
            parse_layer_map(self.hidden_layer_map)
        if self.hidden_loss_weight > 0 and (self.teacher_cache or self.teacher_server):
            source = "teacher_cache" if self.teacher_cache else "teacher_server"
            raise UserError(
                f"hidden_loss_weight > 0 needs the teacher's hidden states, and {source} gives only its top-k "
                "targets: load the teacher here (teacher_model_name_or_path, no teacher_cache or teacher_server) "
                "or set hidden_loss_weight: 0"
            )
        if not 0.0 <= self.lmbda <= 1.0:
            raise UserError(f"lmbda must be in [0, 1] (the on-policy fraction of batches), got {self.lmbda}")
        if self.lmbda > 0:
            if self.teacher_cache:
                raise UserError(
                    "lmbda > 0 needs a teacher that grades the student's own samples, and a teacher_cache holds "
                    "targets for the data's completions only: set teacher_model_name_or_path instead"
                )
            if self.alpha == 0:
                raise UserError(
                    "lmbda > 0 with alpha: 0 trains the student on its own samples with no teacher term; "
                    "set alpha > 0 (on-policy distillation usually uses alpha: 1)"
                )
            if self.max_new_tokens < 1:
                raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
            if not self.generation_temperature > 0:
                raise UserError(f"generation_temperature must be > 0, got {self.generation_temperature}")
            if not 0.0 < self.top_p <= 1.0:
                raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.vllm_sync_steps < 1:
            raise UserError(f"vllm_sync_steps must be >= 1, got {self.vllm_sync_steps}")
        if self.use_vllm and self.lmbda == 0:
            raise UserError("use_vllm samples the student's on-policy completions, and lmbda is 0: set lmbda > 0")
        if self.use_vllm and not self.vllm_server:
            raise UserError(
                "use_vllm needs vllm_server: the URL of a vLLM server serving the student (README, On-policy "
                "distillation)"
            )
        if self.bf16 and not self.use_cpu:
            check_bf16_hardware()
        super().__post_init__()

    @property
    def resolved_teacher_dtype(self) -> str:
        """The dtype the teacher is loaded and run in: teacher_dtype, with auto following the training precision."""
        if self.teacher_dtype != "auto":
            return self.teacher_dtype
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"


# What a `distill train` recipe (and `distill cache-teacher`, which reads the same recipe) fills. Here
# rather than in distill.train so that distill.teacher_cache can use it without importing the job.
TRAIN_ARGUMENTS = (ModelArguments, DataArguments, DistillConfig)
