"""The `distill prune` job: cut a smaller student out of the teacher (Minitron-style depth and width
pruning), to be distilled from it.

recipe -> target shape checked against the teacher's config (no weights) -> calibration data ->
teacher -> importance (distill.importance: one pass) -> which layers, heads, neurons and channels
stay -> the student's weights sliced out of the teacher's -> saved folder + prune_report.json/.md.

The student is the teacher's architecture with a new shape: the kept layers in their order; in each,
the kept query heads (whole key/value groups, so grouped-query attention stays valid) with their
rows of q/k/v (and biases) and columns of o_proj, the kept MLP neurons' rows of gate/up and columns
of down; the kept embedding channels in the embeddings, the output layer, every norm and every
projection. head_dim is kept and written into the config. Keeping every unit gives the teacher back.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from distill.config import DTYPES, DataArguments, _check_writable, _finished_run
from distill.errors import NonFiniteError, UserError
from distill.recipe import load_recipe, parse

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # SmolLM2 and Llama 3.x are llama
DEPTH_IMPORTANCE = ("block_influence", "loss_on_removal", "contiguous")
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass
class PruneConfig:
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The model to prune: a hub id, a local directory or a .gguf file."}
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Calibration data, any form `distill train` reads (text, prompt/completion, messages; a file, "
            "folder or hub dataset). Importance is measured on it; eval_fraction of it is held out for perplexity."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name, if any."})
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset` to read."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the pruned student (save_pretrained + tokenizer) and its report go."}
    )
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Student layers (unset: the teacher's)."})
    hidden_size: int | None = field(
        default=None, metadata={"help": "Student width, embedding channels (unset: the teacher's)."}
    )
    intermediate_size: int | None = field(
        default=None, metadata={"help": "MLP neurons per layer (unset: the teacher's)."}
    )
    num_attention_heads: int | None = field(
        default=None,
        metadata={
            "help": "Query heads per layer (unset: the teacher's, or num_key_value_heads x the teacher's query "
            "heads per KV head). head_dim stays the teacher's."
        },
    )
    num_key_value_heads: int | None = field(
        default=None,
        metadata={
            "help": "Key/value heads per layer (unset: the teacher's, or num_attention_heads / the teacher's "
            "query heads per KV head, so whole GQA groups are pruned)."
        },
    )
    depth_importance: str = field(
        default="block_influence",
        metadata={
            "help": "How layers are ranked: block_influence (1 - cos between a layer's input and output; one "
            "pass), loss_on_removal (calibration loss increase when the layer is skipped; a pass per layer), or "
            "contiguous (remove the run of layers whose input and output are closest in angle)."
        },
    )
    calibration_samples: int = field(
        default=1024,
        metadata={"help": "Rows of `dataset` read (before packing); eval_fraction of them are held out."},
    )
    max_length: int = field(default=512, metadata={"help": "Tokens per calibration sequence (text is packed)."})
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the calibration rows held out for teacher vs student perplexity (0: none)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Dtype the teacher runs in and the student is saved in: auto (as saved), float32, bfloat16."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a model."}
    )

    def __post_init__(self):
        for key in ("teacher_model_name_or_path", "dataset", "output_dir"):
            if not getattr(self, key):
                raise UserError(f"{key} is required (see `distill prune --help_keys`)")
        if self.depth_importance not in DEPTH_IMPORTANCE:
            raise UserError(
                f"unknown depth_importance {self.depth_importance!r}; choose one of {', '.join(DEPTH_IMPORTANCE)}"
            )
        for key in (*SHAPE_KEYS, "calibration_samples", "batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"{key} must be at least 1, got {value}")
        if self.max_length < 2:
            raise UserError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype={self.dtype!r} is not a dtype distill knows; use one of {', '.join(DTYPES)}")

    def shape(self) -> dict:
        return {k: getattr(self, k) for k in SHAPE_KEYS}


ARGUMENTS = (PruneConfig,)


# ---------------------------------------------------------------------------------------------------
# The target shape, checked against the teacher's config


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def target_shape(config, wanted: dict, teacher: str = "the teacher") -> dict:
    """The student's shape: ``wanted``'s values, the teacher's where unset; a UserError for a shape
    pruning cannot make from ``config`` (the teacher's). Needs the config only, not the weights."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(
            f"{teacher} is a {kind!r} model; distill prune knows {', '.join(SUPPORTED)} (SmolLM2 and Llama 3 are "
            "llama, Qwen2.5 is qwen2)"
        )
    shape = {k: wanted.get(k) for k in SHAPE_KEYS}
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        shape[key] = shape[key] or getattr(config, key)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    per = heads // kv  # query heads per key/value head in the teacher
    h, g = shape["num_attention_heads"], shape["num_key_value_heads"]
    if h is None and g is None:
        h, g = heads, kv
    elif g is None:
        if h % per:
            raise UserError(
                f"num_attention_heads {h}: the teacher has {per} query heads per key/value head and pruning "
                f"keeps whole groups, so choose a multiple of {per}, or set num_key_value_heads too"
            )
        g = h // per
    elif h is None:
        h = g * per
    shape["num_attention_heads"], shape["num_key_value_heads"] = h, g
    for key in SHAPE_KEYS:
        if shape[key] > getattr(config, key):
            raise UserError(
                f"{key} {shape[key]} is more than the teacher's {getattr(config, key)}: pruning only removes; "
                f"choose {key} <= {getattr(config, key)}"
            )
    if h % g:
        raise UserError(
            f"num_key_value_heads {g} does not divide num_attention_heads {h}: grouped-query attention needs "
            "the same number of query heads per key/value head"
        )
    if h // g > per:
        raise UserError(
            f"{h} query heads on {g} key/value heads is {h // g} per group, but a teacher group holds {per}: "
            f"set num_key_value_heads to at least {-(-h // per)}"
        )
    hd = head_dim_of(config)
    # A teacher whose width is heads x head_dim may be read by tools that derive head_dim from the width
    # (hidden_size / num_attention_heads); its students keep that rule. Qwen3-style configs set it apart.
    if config.hidden_size == heads * hd and shape["hidden_size"] % h:
        raise UserError(
            f"num_attention_heads {h} does not divide hidden_size {shape['hidden_size']}: the teacher's width is "
            f"its heads x head_dim, so keep hidden_size a multiple of the heads (e.g. {shape['hidden_size'] // h * h})"
        )
    return shape


def student_config(config, shape: dict, layers: list[int]):
    """The teacher's config with the new shape; head_dim explicit, per-layer lists cut to the kept layers."""
    values = config.to_dict()
    values.update(shape, head_dim=head_dim_of(config))
    for key in ("_name_or_path", "transformers_version"):
        values.pop(key, None)
    if isinstance(values.get("layer_types"), list):
        values["layer_types"] = [values["layer_types"][i] for i in layers]
    if "max_window_layers" in values:  # qwen2/3: layers from this index on use sliding windows
        values["max_window_layers"] = sum(i < config.max_window_layers for i in layers)
    return type(config).from_dict(values)


# ---------------------------------------------------------------------------------------------------
# Surgery

# parameter name (after "model.layers.N.") -> (what its rows are, what its columns are)
_LAYER_PARAMS = {
    "self_attn.q_proj.weight": ("heads", "channels"),
    "self_attn.q_proj.bias": ("heads", None),
    "self_attn.k_proj.weight": ("kv", "channels"),
    "self_attn.k_proj.bias": ("kv", None),
    "self_attn.v_proj.weight": ("kv", "channels"),
    "self_attn.v_proj.bias": ("kv", None),
    "self_attn.o_proj.weight": ("channels", "heads"),
    "self_attn.o_proj.bias": ("channels", None),
    "self_attn.q_norm.weight": (None, None),  # per head_dim, shared by the heads
    "self_attn.k_norm.weight": (None, None),
    "mlp.gate_proj.weight": ("neurons", "channels"),
    "mlp.gate_proj.bias": ("neurons", None),
    "mlp.up_proj.weight": ("neurons", "channels"),
    "mlp.up_proj.bias": ("neurons", None),
    "mlp.down_proj.weight": ("channels", "neurons"),
    "mlp.down_proj.bias": ("channels", None),
    "input_layernorm.weight": ("channels", None),
    "post_attention_layernorm.weight": ("channels", None),
}
_MODEL_PARAMS = {
    "model.embed_tokens.weight": (None, "channels"),
    "model.norm.weight": ("channels", None),
    "lm_head.weight": (None, "channels"),
}


def _rows(indices: list[int], size: int) -> torch.Tensor:
    """Row indices of heads ``indices`` when each head owns ``size`` consecutive rows."""
    return (torch.tensor(indices)[:, None] * size + torch.arange(size)).flatten()


def slice_state_dict(state: dict, keep: dict, head_dim: int) -> dict:
    """The student's weights from the teacher's ``state``. ``keep``: "layers" (teacher layer of each
    student layer), "channels", and per student layer "heads", "kv", "neurons" (lists of indices)."""
    out = {}
    channels = torch.tensor(keep["channels"])

    def cut(tensor, rows, cols, index):
        for dim, kind in ((0, rows), (1, cols)):
            if kind is None:
                continue
            if kind == "channels":
                idx = channels
            elif kind == "neurons":
                idx = torch.tensor(keep["neurons"][index])
            else:
                idx = _rows(keep[kind][index], head_dim)
            tensor = tensor.index_select(dim, idx.to(tensor.device))
        return tensor.contiguous()

    for name, tensor in state.items():
        if name in _MODEL_PARAMS:
            out[name] = cut(tensor, *_MODEL_PARAMS[name], None)
            continue
        parts = name.split(".")
        if parts[:2] != ["model", "layers"]:
            raise ValueError(f"no pruning rule for parameter {name}")
        layer, rest = int(parts[2]), ".".join(parts[3:])
        if rest not in _LAYER_PARAMS:
            raise ValueError(f"no pruning rule for parameter {name}")
        if layer not in keep["layers"]:
            continue
        index = keep["layers"].index(layer)
        out[f"model.layers.{index}.{rest}"] = cut(tensor, *_LAYER_PARAMS[rest], index)
    return out


def build_student(teacher, config, keep: dict):
    """The pruned model, its weights sliced out of ``teacher``'s (no random initialisation)."""
    from transformers import AutoModelForCausalLM

    state = slice_state_dict(teacher.state_dict(), keep, head_dim_of(teacher.config))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    student.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    student.tie_weights()
    # Buffers are not in the state dict (rotary inv_freq): the teacher's, the head_dim being the same.
    teacher_buffers = dict(teacher.named_buffers())
    for name, buffer in list(student.named_buffers()):
        if buffer.is_meta:
            module, _, leaf = name.rpartition(".")
            student.get_submodule(module).register_buffer(leaf, teacher_buffers[name].clone(), persistent=False)
    missing = [n for n, p in (*student.named_parameters(), *student.named_buffers()) if p.is_meta]
    if missing:
        raise ValueError(f"parameters without weights after slicing: {missing[:5]}")
    student.generation_config = teacher.generation_config
    return student


# ---------------------------------------------------------------------------------------------------
# Choosing what stays


def choose(importance, config, shape: dict, method: str, removal=None) -> dict:
    """Indices kept (see `slice_state_dict`) from the scores of `distill.importance`."""
    from distill import importance as imp

    n = config.num_hidden_layers
    if method == "contiguous":
        layers = imp.keep_contiguous(importance.block_distance, n, shape["num_hidden_layers"])
    else:
        scores = removal if method == "loss_on_removal" else importance.block_influence
        layers = imp.keep_layers(scores, shape["num_hidden_layers"])
    per = shape["num_attention_heads"] // shape["num_key_value_heads"]
    heads, kv, neurons = [], [], []
    for i in layers:
        q, g = imp.keep_heads(importance.heads[i], config.num_key_value_heads, shape["num_key_value_heads"], per)
        heads.append(q)
        kv.append(g)
        neurons.append(imp.top(importance.neurons[i], shape["intermediate_size"]))
    channels = imp.top(importance.channels, shape["hidden_size"])
    return {"layers": layers, "channels": channels, "heads": heads, "kv": kv, "neurons": neurons}


# ---------------------------------------------------------------------------------------------------
# The job


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


def batches_of(rows, collator, batch_size: int) -> list[dict]:
    return [
        collator([rows[j] for j in range(i, min(i + batch_size, len(rows)))]) for i in range(0, len(rows), batch_size)
    ]


def check_output_dir(config: PruneConfig) -> None:
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a directory: give a folder path for the pruned student")
    finished = _finished_run(out)
    if finished and not config.overwrite_output_dir:
        raise UserError(
            f"output_dir {out} already holds a model ({finished}): choose another output_dir, or set "
            "overwrite_output_dir: true to replace it"
        )
    _check_writable(out)


def teacher_config(name: str):
    from transformers import AutoConfig

    from distill.models import resolve

    where, gguf_file = resolve(name)
    try:
        return AutoConfig.from_pretrained(where, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"could not read the config of {name}: {type(err).__name__}: {err}") from err


def run(recipe_path: str, overrides: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer, set_seed

    from distill import importance as imp
    from distill.cost import pflops_days
    from distill.data import Collator, build_datasets
    from distill.flops import FlopMeter
    from distill.models import check_max_length, load_model, load_tokenizer, resolve

    start = time.perf_counter()
    recipe = load_recipe(recipe_path, overrides)
    (config,) = parse(recipe, ARGUMENTS)
    check_output_dir(config)
    tconfig = teacher_config(config.teacher_model_name_or_path)
    shape = target_shape(tconfig, config.shape(), config.teacher_model_name_or_path)
    check_max_length(config.teacher_model_name_or_path, config.max_length, "teacher")

    set_seed(config.seed)
    tokenizer = load_tokenizer(config.teacher_model_name_or_path)
    data = DataArguments(
        dataset=config.dataset, dataset_config=config.dataset_config, dataset_split=config.dataset_split,
        eval_fraction=config.eval_fraction, max_length=config.max_length,
        max_train_samples=config.calibration_samples,
    )  # fmt: skip
    calibration, held_out = build_datasets(data, tokenizer, seed=config.seed)
    collator = Collator(tokenizer.pad_token_id)
    batches = batches_of(calibration, collator, config.batch_size)
    held_out_batches = batches_of(held_out, collator, config.batch_size) if held_out is not None else []

    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_model(config.teacher_model_name_or_path, config.dtype).to(device).eval()
    meter, seconds = FlopMeter(), {}
    removed = tconfig.num_hidden_layers - shape["num_hidden_layers"]
    block = removed if config.depth_importance == "contiguous" and removed else None
    t = time.perf_counter()
    scores = imp.calibrate(teacher, batches, block=block, meter=meter)
    seconds["importance"] = time.perf_counter() - t
    for name, value in asdict(scores).items():
        if isinstance(value, torch.Tensor) and not torch.isfinite(value).all():
            raise NonFiniteError(f"the teacher's activations on the calibration data gave non-finite {name} scores")
    removal = None
    if config.depth_importance == "loss_on_removal":
        t = time.perf_counter()
        removal = imp.loss_on_removal(teacher, batches, meter=meter)
        seconds["loss_on_removal"] = time.perf_counter() - t
    if config.depth_importance == "contiguous" and not removed:
        scores.block_distance = torch.zeros(1, dtype=torch.float64)
    keep = choose(scores, tconfig, shape, config.depth_importance, removal)

    scfg = student_config(tconfig, shape, keep["layers"])
    student = build_student(teacher, scfg, keep)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    where, gguf_file = resolve(config.teacher_model_name_or_path)
    AutoTokenizer.from_pretrained(where, gguf_file=gguf_file).save_pretrained(out)  # as the teacher has it
    del student
    # The folder as every later job reads it: proof that it loads, and the model measured below.
    student = load_model(str(out), config.dtype).to(device).eval()

    perplexity = None
    if held_out_batches:
        t = time.perf_counter()
        losses = {
            "teacher": imp.mean_loss(teacher, held_out_batches, meter, "held_out_perplexity", ("teacher",)),
            "student": imp.mean_loss(student, held_out_batches, meter, "held_out_perplexity", ("student",)),
        }
        seconds["held_out_perplexity"] = time.perf_counter() - t
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in held_out_batches)
        perplexity = {**{k: float(torch.tensor(v).exp()) for k, v in losses.items()}, "tokens": tokens}
    seconds["total"] = time.perf_counter() - start

    flops = {**meter.flops, "total": meter.total}
    report = {
        "teacher": config.teacher_model_name_or_path,
        "student": str(out),
        "model_type": tconfig.model_type,
        "depth_importance": config.depth_importance,
        "shape": {
            "teacher": {k: getattr(tconfig, k) for k in SHAPE_KEYS} | {"head_dim": head_dim_of(tconfig)},
            "student": shape | {"head_dim": head_dim_of(tconfig)},
        },
        "parameters": {"teacher": parameters(teacher), "student": parameters(student)},
        "perplexity": perplexity,
        # student layer i is teacher layer layer_map[i]: hidden state i + 1 of the student (the output of
        # its layer i) is aligned with the teacher's hidden state layer_map[i] + 1; the student's channel c
        # is the teacher's channel kept["hidden_size"][c].
        "layer_map": keep["layers"],
        "kept": {
            "layers": keep["layers"],
            "hidden_size": keep["channels"],
            "attention_heads": keep["heads"],
            "key_value_heads": keep["kv"],
            "intermediate": keep["neurons"],
        },
        "importance": {
            "block_influence": scores.block_influence.tolist(),
            "loss_on_removal": None if removal is None else removal.tolist(),
            "contiguous_block_distance": None if block is None else scores.block_distance.tolist(),
            "hidden_channels": scores.channels.tolist(),
            "attention_heads": scores.heads.tolist(),
            "intermediate": scores.neurons.tolist(),
        },
        "calibration": {
            "dataset": config.dataset,
            "rows": config.calibration_samples,
            "sequences": len(calibration),
            "tokens": scores.tokens,
            "held_out_sequences": 0 if held_out is None else len(held_out),
            "max_length": config.max_length,
        },
        # The bill of making this student; a training run from it adds cost.flops.total to its own.
        "cost": {
            "flops": flops,
            "pflops_days": {k: pflops_days(v) for k, v in flops.items()},
            "tokens": meter.tokens,
            "wall_seconds": seconds,
            "devices": 1,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "measured": "model FLOPs counted by torch.utils.flop_counter (distill.flops.FlopMeter)",
        },
        "recipe": recipe,
    }
    (out / "prune_report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "prune_report.md").write_text(render_markdown(report), encoding="utf-8")
    (out / "prune_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    print(summary(report))
    return report


def _join(values: list) -> str:
    return ", ".join(str(v) for v in values)


def render_markdown(r: dict) -> str:
    t, s = r["shape"]["teacher"], r["shape"]["student"]
    p, c = r["parameters"], r["cost"]
    lines = [
        f"# Pruned from {r['teacher']}",
        "",
        f"Depth importance: `{r['depth_importance']}`. Calibration: {r['calibration']['sequences']} sequences, "
        f"{r['calibration']['tokens']:,} tokens of `{r['calibration']['dataset']}`.",
        "",
        "| | teacher | student |",
        "|---|---:|---:|",
        *(f"| {k} | {t[k]} | {s[k]} |" for k in (*SHAPE_KEYS, "head_dim")),
        f"| parameters | {p['teacher']:,} | {p['student']:,} ({p['student'] / p['teacher']:.1%}) |",
    ]
    if r["perplexity"]:
        pp = r["perplexity"]
        lines.append(f"| held-out perplexity ({pp['tokens']:,} tokens) | {pp['teacher']:.4g} | {pp['student']:.4g} |")
    lines += [
        "",
        "## Layers",
        "",
        "| teacher layer | block influence | loss on removal | kept as student layer |",
        "|---:|---:|---:|---:|",
    ]
    imp, removal = r["importance"], r["importance"]["loss_on_removal"]
    for i, bi in enumerate(imp["block_influence"]):
        lr = f"{removal[i]:.4g}" if removal else ""
        kept = r["layer_map"].index(i) if i in r["layer_map"] else "removed"
        lines.append(f"| {i} | {bi:.4g} | {lr} | {kept} |")
    lines += [
        "",
        "## Width",
        "",
        f"- hidden channels kept: {len(r['kept']['hidden_size'])} of {t['hidden_size']}",
        *(
            f"- student layer {j} (teacher {i}): KV heads {_join(kv)}; query heads {_join(q)}; "
            f"{len(n)} of {t['intermediate_size']} MLP neurons"
            for j, (i, kv, q, n) in enumerate(
                zip(
                    r["layer_map"],
                    r["kept"]["key_value_heads"],
                    r["kept"]["attention_heads"],
                    r["kept"]["intermediate"],
                )
            )
        ),
        "",
        "Every unit's score and kept index list is in prune_report.json.",
        "",
        "## Cost (measured)",
        "",
        "| part | FLOPs | PFlop/s-day | seconds |",
        "|---|---:|---:|---:|",
        *(
            f"| {k} | {v:.4g} | {c['pflops_days'][k]:.4g} | {c['wall_seconds'].get(k, float('nan')):.1f} |"
            for k, v in c["flops"].items()
        ),
        "",
    ]
    return "\n".join(lines)


def _shape(x: dict) -> str:
    return (
        f"{x['num_hidden_layers']} layers x {x['hidden_size']}, {x['num_attention_heads']}/"
        f"{x['num_key_value_heads']} heads, MLP {x['intermediate_size']}"
    )


def summary(r: dict) -> str:
    t, s, p, c = r["shape"]["teacher"], r["shape"]["student"], r["parameters"], r["cost"]
    lines = [
        "",
        "distill prune: done",
        f"  teacher  {_shape(t)}  {p['teacher']:,} parameters",
        f"  student  {_shape(s)}  {p['student']:,} parameters ({p['student'] / p['teacher']:.1%})",
        f"  layers kept ({r['depth_importance']}): {_join(r['layer_map'])}",
    ]
    if r["perplexity"]:
        pp = r["perplexity"]
        lines.append(
            f"  held-out perplexity  teacher {pp['teacher']:.4g}  student {pp['student']:.4g}  ({pp['tokens']:,} tokens)"
        )
    lines += [
        f"  cost (measured)  {c['flops']['total']:.4g} FLOPs  {c['pflops_days']['total']:.4g} PFlop/s-day  "
        f"{c['wall_seconds']['total']:.1f} s",
        f"  student saved to {r['student']} (report: prune_report.json, prune_report.md)",
    ]
    return "\n".join(lines)
