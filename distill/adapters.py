"""LoRA, DoRA and QLoRA students through PEFT, and `distill merge`.

A recipe's adapter keys (`use_peft`, `lora_r`, ... on `ModelArguments`) become one `peft.LoraConfig`.
The base model stays frozen; PEFT adds the low-rank update W + (lora_alpha / r) * B @ A to the
targeted layers and the Trainer then sees only A and B (and any `lora_modules_to_save`) as
trainable. Saving a `PeftModel` writes PEFT's own format (adapter_config.json +
adapter_model.safetensors), which `merge` folds back into a plain transformers model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils import ModulesToSaveWrapper
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
from transformers.pytorch_utils import Conv1D

from distill.config import ModelArguments
from distill.errors import UserError
from distill.models import _hub_error, follow_umask, load_model, load_tokenizer, resolve, torch_dtype

ALL_LINEAR = "all-linear"


def lora_config(args: ModelArguments) -> LoraConfig:
    # A fresh config every call: get_peft_model rewrites target_modules="all-linear" into the names it found.
    targets = args.lora_target_modules
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        # PEFT reads the string "all-linear" as the shorthand, a list as name suffixes.
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
        modules_to_save=args.lora_modules_to_save,
        use_dora=args.use_dora,
    )


@contextlib.contextmanager
def quiet_peft_wrapping():
    """Around PEFT's wrapping of a model (get_peft_model, PeftModel.from_pretrained). PEFT 0.21 reads
    the model's `is_gradient_checkpointing`, which transformers 5 deprecated for
    `is_activation_checkpointing`: a FutureWarning on every LoRA run that only PEFT can act on. This
    one warning, from that one property, is silenced; any other still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
            module="transformers.modeling_utils",
        )
        yield


def check(args: ModelArguments, training) -> None:
    """Everything about the adapter settings a user can get wrong, before any weight is read."""
    path = Path(args.model_name_or_path).expanduser()
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise UserError(
            f"{args.model_name_or_path} holds a LoRA adapter, not a full model: fold it into its base first "
            f"(distill merge {args.model_name_or_path} --output DIR) and give DIR as model_name_or_path"
        )
    if not args.use_peft:
        return
    if args.load_in_4bit:
        check_qlora_can_run(training.use_cpu)
    check_targets(args)


def check_qlora_can_run(use_cpu: bool) -> None:
    missing = []
    if use_cpu or not torch.cuda.is_available():
        missing.append("use_cpu is set" if use_cpu else "this machine has no CUDA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if missing:
        raise UserError(
            f"load_in_4bit (QLoRA) needs a CUDA GPU and the bitsandbytes package, but {' and '.join(missing)}. "
            "Drop load_in_4bit to train plain LoRA on the full-precision base."
        )


def check_targets(args: ModelArguments) -> None:
    """Apply the LoRA config to a weightless (meta-device) copy of the model, so that target modules
    matching nothing, or a layer type PEFT cannot adapt, fail in a second rather than after loading."""
    where, gguf_file = resolve(args.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=gguf_file)
    except OSError as err:
        raise _hub_error(args.model_name_or_path, err) from err
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
        kind = type(skeleton).__name__
        modules = dict(skeleton.named_modules())
        try:
            with quiet_peft_wrapping():
                wrapped = get_peft_model(skeleton, lora_config(args))
        except ValueError as err:
            linear = {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D))}
            raise UserError(
                f"lora_target_modules {args.lora_target_modules} does not fit {kind}: {err} "
                f"Its linear layers are named: {', '.join(sorted(linear))} (or use all-linear)."
            ) from err
    saved = [n for n, m in wrapped.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name in args.lora_modules_to_save or []:
        if not any(n.endswith(name) for n in saved):  # PEFT matched by name suffix; did it match this one?
            named = sorted({n.rsplit(".", 1)[-1] for n in modules if n and not n[-1].isdigit()})
            raise UserError(
                f"lora_modules_to_save: {name!r} names no module of {kind}, whose modules are: {', '.join(named)}"
            )


def quantization_config(args: ModelArguments) -> BitsAndBytesConfig | None:
    if not args.load_in_4bit:
        return None
    # NF4 with double quantization, as in the QLoRA paper; matmuls run in the recipe's dtype.
    compute = torch.bfloat16 if args.dtype == "auto" else torch_dtype(args.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def load_student(args: ModelArguments, training):
    """The model to train: loaded as the recipe says, then wrapped with LoRA when `use_peft` is set."""
    kwargs = {}
    if args.load_in_4bit:
        # bitsandbytes places 4-bit weights at load time: each process on its own GPU.
        kwargs = {"quantization_config": quantization_config(args), "device_map": {"": training.local_process_index}}
    model = load_model(args.model_name_or_path, args.dtype, args.attn_implementation, **kwargs)
    if not args.use_peft:
        return model
    if args.load_in_4bit:
        # Casts the few unquantized weights (norms) to fp32 and lets gradients reach the first adapter.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training.gradient_checkpointing)
    # The adapters' initial weights are drawn here, before the Trainer seeds the run: without a seed
    # two runs of one recipe would start, and end, apart.
    set_seed(training.seed)
    with quiet_peft_wrapping():
        return get_peft_model(model, lora_config(args))


def trainable_parameters(model) -> str:
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit packed weights at full size
    else:
        # Under ZeRO-3 a parameter here is a 0-element placeholder; ds_numel is its real size.
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


def saved_to(model, output_dir: str, what: str) -> str:
    """The summary's last line: where the result is, and for an adapter how to get a full model."""
    if isinstance(model, PeftModel):
        return f"adapter saved to {output_dir} (full model: distill merge {output_dir} --output {output_dir}-merged)"
    return f"{what} saved to {output_dir}"


def merge(adapter_dir: str, output_dir: str, base: str | None = None, dtype: str = "float32") -> str:
    """Fold an adapter into its base: W <- W + (lora_alpha / r) * B @ A, saved as a plain transformers
    model (with the tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without peft."""
    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} holds no adapter_config.json: give the folder a use_peft run saved")
    if Path(output_dir).resolve() == adapter.resolve():
        raise UserError("--output must differ from the adapter folder: the merged model is a separate folder")
    if base is None:
        base = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
        try:
            resolve(base)
        except UserError as err:
            raise UserError(f"the base model named in adapter_config.json: {err}; pass --base PATH") from err
    with quiet_peft_wrapping():
        model = PeftModel.from_pretrained(load_model(base, dtype), adapter_dir).merge_and_unload()
    model.save_pretrained(output_dir)
    # The run saved its tokenizer next to the adapter; an adapter from elsewhere may rely on the base's.
    if (adapter / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(output_dir)
    else:
        load_tokenizer(base).save_pretrained(output_dir)
    follow_umask(output_dir)
    return f"merged {adapter_dir} into {base}; full model saved to {output_dir}"
