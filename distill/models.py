"""Loading models and tokenizers from a hub id, a local directory or a llama.cpp GGUF file,
and the one check distillation needs between two of them: the same tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None), or a ValueError saying what is missing."""
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {name_or_path}")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(
                f"{name_or_path} is not a model directory (no config.json in it); give a folder written by "
                "save_pretrained, a .gguf file, or a hub id"
            )
        return str(path), None
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped local path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise ValueError(f"model path not found: {name_or_path}")
    return name_or_path, None


def _hub_error(name_or_path: str, err: Exception) -> ValueError:
    return ValueError(
        f"could not load {name_or_path!r}: it is not a local model directory, and loading it as a hub id "
        f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Check the path, or "
        "download the model first (huggingface-cli download) and give its local directory."
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    where, gguf_file = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    if tokenizer.pad_token is None:
        # Padding positions are masked out of every loss, so any id will do; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    if gguf_file:
        tokenizer.gguf_placeholder_ids = gguf_placeholder_ids(str(Path(where) / gguf_file), len(tokenizer))
    return tokenizer


def gguf_placeholder_ids(path: str, size: int) -> frozenset[int]:
    """Ids of a tokenizer rebuilt from a GGUF file that name no token of the model. llama.cpp's
    convert_hf_to_gguf pads the token list to the embedding height with "[PAD{id}]" entries typed
    UNUSED, and transformers' byte-level builder appends GPT-2's "<|endoftext|>" past the file's list
    when the file has none. Both would otherwise make a GGUF teacher's vocabulary differ from the
    student's it was converted alongside."""
    from gguf import GGUFReader, TokenType

    fields = GGUFReader(path).fields
    count = len(fields["tokenizer.ggml.tokens"].data)
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else []
    return frozenset(i for i, kind in enumerate(types) if kind == TokenType.UNUSED) | frozenset(range(count, size))


def torch_dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def load_model(name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None, **kwargs):
    where, gguf_file = resolve(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            where,
            gguf_file=gguf_file,
            dtype=torch_dtype(dtype),
            attn_implementation=attn_implementation,
            **kwargs,
        )
    except OSError as err:
        raise _hub_error(name_or_path, err) from err


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Logit distillation compares distributions id by id, so both sides must mean the same thing by
    every id. Embedding padding (a wider teacher head, or a GGUF's placeholder tokens for it) is fine;
    a different vocabulary is not."""
    vs, vt = _real_vocab(student), _real_vocab(teacher)
    if vs == vt:
        return
    differing = sorted(set(vs.items()) ^ set(vt.items()), key=lambda kv: kv[1])[:5]
    raise ValueError(
        f"teacher and student tokenizers differ (student {len(vs)} tokens, teacher {len(vt)}; e.g. "
        f"{differing}). Logit distillation needs one tokenizer: pick models of the same family, or "
        "distill from teacher generations instead (sequence-level KD)."
    )


def _real_vocab(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    skip = getattr(tokenizer, "gguf_placeholder_ids", frozenset())
    return {token: i for token, i in tokenizer.get_vocab().items() if i not in skip}


def vocab_sizes_fit(tokenizer: PreTrainedTokenizerBase, *models) -> None:
    """Every real token id must have a logit in every model; padded extra rows are fine."""
    for model in models:
        weight = model.get_output_embeddings().weight
        width = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 leaves a 0-element placeholder
        if width < len(tokenizer):
            raise ValueError(
                f"{model.name_or_path} has {width} output logits but the tokenizer has {len(tokenizer)} tokens; "
                "the model and tokenizer do not belong together"
            )
