"""Write a Hugging Face Llama folder as a llama.cpp GGUF file, the way llama.cpp's
convert_hf_to_gguf.py does, so tests can load a teacher from a real-shaped .gguf without a download.

Three llama.cpp conventions matter, and each is reproduced here because transformers' loader undoes it:
- q/k projection rows are permuted from the rotate-half rotary layout (transformers) to the interleaved
  one (ggml); the loader's LlamaTensorProcessor permutes them back.
- the token list is padded to the embedding height with "[PAD{i}]" placeholders of type UNUSED, so a
  teacher whose vocabulary was rounded up (960 rows, 902 tokens) gets 960 tokens in the file.
- a byte-level BPE is stored as tokenizer.ggml.model "gpt2": tokens in the byte alphabet, merges as
  "a b" strings, special tokens typed CONTROL, bos/eos/pad ids, add_bos_token.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from transformers import AutoTokenizer, LlamaForCausalLM


def permute_for_ggml(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rows (head, half, pair) -> (head, pair, half)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(model_dir: str, path: Path, qtype=gguf.GGMLQuantizationType.F32) -> Path:
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(Path(model_dir).name)
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if qtype == gguf.GGMLQuantizationType.F32 else gguf.LlamaFileType.MOSTLY_Q8_0
    )
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    # Tokenizer, as convert_hf_to_gguf's get_vocab_base + SpecialVocab write it.
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in special else gguf.TokenType.NORMAL)
    merges = json.loads(Path(model_dir, "tokenizer.json").read_text())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(tokenizer("x").input_ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes output.weight only when it is not the embedding
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = tensor.numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_for_ggml(data, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_for_ggml(data, cfg.num_key_value_heads)
        if qtype != gguf.GGMLQuantizationType.F32 and data.ndim == 2:  # llama.cpp keeps 1-D norms in F32
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
