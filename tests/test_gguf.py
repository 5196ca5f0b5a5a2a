"""A teacher can come from a llama.cpp GGUF file (issue 2). The file is written here from the tiny teacher
the way llama.cpp's convert_hf_to_gguf.py writes it (tests/gguf_writer.py), then loaded through
distill.models like any teacher: same logits, same tokenizer, and the same `distill train` run."""

import json

import gguf
import pytest
import torch

from distill import train
from distill.models import check_same_tokenizer, load_model, load_tokenizer

from conftest import DATA, STUDENT, TEACHER
from gguf_writer import write_llama_gguf

Q8_0 = gguf.GGMLQuantizationType.Q8_0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {
        "f32": str(write_llama_gguf(TEACHER, folder / "teacher-f32.gguf")),
        "q8_0": str(write_llama_gguf(TEACHER, folder / "teacher-q8_0.gguf", Q8_0)),
    }


@pytest.fixture(scope="module")
def original():
    return load_model(TEACHER)


@pytest.fixture(scope="module")
def token_ids():
    """Three corpus sentences and one run of random ids over every row, padded ones included."""
    tokenizer = load_tokenizer(TEACHER)
    lines = (DATA / "corpus_eval.jsonl").read_text().splitlines()[:3]
    text = [tokenizer(json.loads(line)["text"]).input_ids[:32] for line in lines]
    width = min(map(len, text))
    noise = torch.randint(0, 960, (1, width), generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.tensor([ids[:width] for ids in text]), noise])


@torch.no_grad()
def test_f32_gguf_gives_the_original_teachers_logits(files, original, token_ids):
    loaded = load_model(files["f32"])
    assert loaded.config.vocab_size == original.config.vocab_size == 960  # padded rows survive the file
    assert not loaded.config.tie_word_embeddings
    # The file holds q in llama.cpp's interleaved rotary layout; the loader must undo it, not just copy it.
    stored = next(t for t in gguf.GGUFReader(files["f32"]).tensors if t.name == "blk.0.attn_q.weight")
    stored, q = torch.from_numpy(stored.data.copy()), original.model.layers[0].self_attn.q_proj.weight
    assert stored.shape == q.shape and not torch.equal(stored, q)
    torch.testing.assert_close(loaded.model.layers[0].self_attn.q_proj.weight, q, atol=0, rtol=0)
    torch.testing.assert_close(loaded(token_ids).logits, original(token_ids).logits, atol=1e-6, rtol=0)


@torch.no_grad()
def test_q8_0_gguf_is_dequantized_to_within_the_block_error(files, original, token_ids):
    """Q8_0 stores each block of 32 weights as int8 times one scale d = max|w|/127 (kept as float16), so a
    dequantized weight is off by at most d/2 plus 127 times the scale's rounding, d * 2**-11; the logits
    then follow the teacher's closely, not exactly."""
    loaded = load_model(files["q8_0"])
    for (name, w), w8 in zip(original.named_parameters(), loaded.parameters()):
        if w.ndim == 2:
            d = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            assert ((w8 - w).reshape(-1, 32).abs() <= d * (0.5 + 127 * 2**-11) + 1e-12).all(), name
            assert not torch.equal(w8, w), name  # really quantized, not stored as floats
        else:
            assert torch.equal(w8, w), name  # norms stay F32, as llama.cpp writes them
    reference, logits = original(token_ids).logits.log_softmax(-1), loaded(token_ids).logits.log_softmax(-1)
    kl = (reference.exp() * (reference - logits)).sum(-1)  # KL(original || Q8_0) at every position
    assert kl.max() < 5e-3  # measured 1.4e-3 on the tiny teacher
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95


def test_gguf_tokenizer_encodes_like_the_original(files):
    """Byte-level BPE round-trips through the file exactly: ids, decoding, specials and chat template.
    What differs is only what names no token: the 58 "[PAD902]".."[PAD959]" placeholders llama.cpp pads
    the list with, and the "<|endoftext|>" transformers' GPT-2 builder appends (id 960, past the model's
    rows). check_same_tokenizer ignores exactly those, and still refuses a real difference."""
    ours, theirs = load_tokenizer(TEACHER), load_tokenizer(files["f32"])
    texts = [json.loads(line)["text"] for line in (DATA / "corpus_eval.jsonl").read_text().splitlines()[:20]]
    texts += ["  two leading spaces, é ü 日本 and tabs\t\n\n", "<|user|>\nhi</s>\n<|assistant|>\nyo</s>", ""]
    for text in texts:
        for special in (True, False):
            ids = ours(text, add_special_tokens=special).input_ids
            assert theirs(text, add_special_tokens=special).input_ids == ids, text
        assert theirs.decode(ids) == ours.decode(ids)
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 0)
    chat = [{"role": "user", "content": "Where is Malbek?"}, {"role": "assistant", "content": "In Zorvia."}]
    assert theirs.apply_chat_template(chat) == ours.apply_chat_template(chat)

    assert len(theirs) == 961 and theirs.convert_ids_to_tokens([902, 960]) == ["[PAD902]", "<|endoftext|>"]
    check_same_tokenizer(ours, theirs)
    ours.add_tokens(["<other-family>"])  # id 902, where the file has a placeholder
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(ours, theirs)


def test_distill_train_with_a_gguf_teacher_is_the_same_run(files, tmp_path):
    def run(teacher, name):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(
            f"model_name_or_path: {STUDENT}\nteacher_model_name_or_path: {teacher}\n"
            f"dataset: {DATA / 'corpus_train.jsonl'}\nmax_train_samples: 8\neval_fraction: 0\nmax_length: 32\n"
            f"max_steps: 1\nper_device_train_batch_size: 2\nlogging_steps: 1\nsave_strategy: 'no'\n"
            f"report_to: none\nuse_cpu: true\nseed: 0\noutput_dir: {tmp_path / name}\n"
        )
        return train.run(str(recipe))

    from_gguf, from_folder = run(files["f32"], "gguf"), run(TEACHER, "folder")
    assert from_gguf["global_step"] == 1 and (tmp_path / "gguf" / "model.safetensors").is_file()
    assert from_gguf["train"]["train_loss"] == pytest.approx(from_folder["train"]["train_loss"], rel=1e-6)
