"""Loading models and tokenizers from a hub id, a local directory or a llama.cpp GGUF file, and
what can be known of them without loading the weights: the one check distillation needs between two
of them (the same tokenizer), their context length, whether a saved file is whole, and a hash of
what a local model is."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from distill.errors import UserError


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None), or a UserError saying what is missing."""
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {name_or_path}")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(
                f"{name_or_path} is not a model directory (no config.json in it); give a folder written by "
                "save_pretrained, a .gguf file, or a hub id"
            )
        return str(path), None
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped local path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise UserError(f"model path not found: {name_or_path}")
    return name_or_path, None


def check_max_length(name_or_path: str, max_length: int, role: str, max_new_tokens: int = 0) -> None:
    """Refuse examples longer than the model has positions for: learned position embeddings fail with an
    index error mid-run, rotary ones silently run past what the model was trained on. With
    ``max_new_tokens`` (on-policy sampling), a prompt of max_length plus its sample must fit. Only a local
    model directory is read (its config.json, no weights); a hub id or GGUF file is not checked here."""
    where, gguf_file = resolve(name_or_path)
    if gguf_file or not Path(where).is_dir():
        return
    try:
        limit = getattr(AutoConfig.from_pretrained(where), "max_position_embeddings", None)
    except (OSError, ValueError, KeyError):  # a config transformers cannot read fails, clearly, when the model loads
        return
    if isinstance(limit, int) and max_length + max_new_tokens > limit:
        if max_new_tokens:
            raise UserError(
                f"max_length {max_length} + max_new_tokens {max_new_tokens} (a prompt and the student's sample) is "
                f"more than the {role} {name_or_path} has positions for (max_position_embeddings {limit}); make "
                f"the two add up to {limit} or less"
            )
        raise UserError(
            f"max_length {max_length} is more than the {role} {name_or_path} has positions for "
            f"(max_position_embeddings {limit}); set max_length: {limit} or less"
        )


def file_damage(path: Path) -> str | None:
    """Why a saved file cannot be whole (cut short by a killed save or a full disk), or None. Reads only
    what locates the data: a safetensors header, a zip's central directory (torch.save's format), or a
    JSON document. Other files are not checked."""
    try:
        if path.suffix == ".safetensors":
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                length = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 0 < length <= size - 8:
                    return f"its header is cut off ({size} bytes)"
                header = json.loads(f.read(length))
            end = 8 + length + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            return None if size >= end else f"it is cut short ({size} of {end} bytes)"
        if path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path):
                return None
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except zipfile.BadZipFile:
        return "it is not a whole zip archive (torch.save's format): cut short"
    except (ValueError, KeyError, TypeError, IndexError) as err:  # undecodable or malformed JSON
        return f"it does not parse ({type(err).__name__}: {err})"
    return None


HASH_BLOCK = 8 << 20  # bytes read per update: large enough that hashing runs at disk speed


def file_sha256(path: Path) -> str:
    digest, block = hashlib.sha256(), bytearray(HASH_BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            digest.update(view[:n])
    return digest.hexdigest()


def local_model_digest(name_or_path: str) -> str | None:
    """sha256 of what a local model is: its config.json (parsed, without the transformers version that
    wrote it, dumped with sorted keys) and the bytes of every weight file, or of its .gguf file. None
    when ``name_or_path`` is not a model on this machine (a hub id, a path that does not exist)."""
    path = Path(name_or_path).expanduser()
    digest = hashlib.sha256()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            return None
        files = [path]
    else:
        if not (path / "config.json").is_file():
            return None
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config.pop("transformers_version", None)
        digest.update(json.dumps(config, sort_keys=True).encode())
        files = sorted(
            f for f in path.iterdir() if f.suffix in (".safetensors", ".bin") and f.name != "training_args.bin"
        )
    for f in files:
        digest.update(f"\0{f.name}\0{file_sha256(f)}".encode())
    return digest.hexdigest()


def _hub_error(name_or_path: str, err: Exception) -> UserError:
    return UserError(
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
    with_pad_token(tokenizer)
    if gguf_file:
        tokenizer.gguf_placeholder_ids = gguf_placeholder_ids(str(Path(where) / gguf_file), len(tokenizer))
    return tokenizer


def with_pad_token(tokenizer) -> PreTrainedTokenizerBase:
    """``tokenizer``, given EOS as its pad token where it has none: padding positions are masked out of
    every loss, so any id will do, and EOS is the usual choice."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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


def same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> bool:
    """Whether both sides mean the same thing by every id, so that distributions compare id by id.
    Embedding padding (a wider teacher head, or a GGUF's placeholder tokens for it) is fine; a
    different vocabulary is not (`distill train` then aligns the two, distill.xtoken)."""
    return _real_vocab(student) == _real_vocab(teacher)


def check_same_tokenizer(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, fix: str | None = None
) -> None:
    """Refuse two tokenizers that are not the same (`same_tokenizer`), for what compares id by id."""
    if same_tokenizer(student, teacher):
        return
    vs, vt = _real_vocab(student), _real_vocab(teacher)
    differing = sorted(set(vs.items()) ^ set(vt.items()), key=lambda kv: kv[1])[:5]
    raise UserError(
        f"teacher and student tokenizers differ (student {len(vs)} tokens, teacher {len(vt)}; e.g. "
        f"{differing}). "
        + (
            fix
            or "This needs one tokenizer: pick models of the same family, or distill from teacher generations "
            "instead (sequence-level KD)."
        )
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
            raise UserError(
                f"{model.name_or_path} has {width} output logits but the tokenizer has {len(tokenizer)} tokens; "
                "the model and tokenizer do not belong together"
            )


def follow_umask(folder: str | os.PathLike) -> None:
    """Give the ``*.safetensors`` files under ``folder`` the mode every other file there has.

    safetensors (0.8) writes a file through a temporary file, which is created 0600 whatever the
    umask, and renames it into place: model.safetensors (and a LoRA run's adapter_model.safetensors)
    would then be unreadable to the group and others who can read the rest of the run, e.g. a
    serving or evaluation job under another user. A plain ``open`` creates 0666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*.safetensors"):
        if path.is_file():
            path.chmod(0o666 & ~mask)
