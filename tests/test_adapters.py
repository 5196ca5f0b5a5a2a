"""Specifications of LoRA / DoRA students (distill.adapters): only adapter weights train, the adapter is
saved in PEFT's format and merges into a plain transformers model with the same logits, all-linear
adapts every linear layer but the head in four model families, resume continues where it stopped,
and bad adapter settings fail in one line before any weight is read."""

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

from distill import adapters
from distill.cli import main
from distill.config import DataArguments, DistillConfig, ModelArguments
from distill.data import Collator, build_datasets
from distill.models import load_model
from distill.trainer import DistillTrainer

from conftest import DATA, STUDENT, TEACHER, StopAt


def lora_args(**overrides):
    values = dict(model_name_or_path=STUDENT, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    values.update(overrides)
    return ModelArguments(**values)


def distill_config(out, **overrides):
    values = dict(
        output_dir=str(out), teacher_model_name_or_path=TEACHER, max_steps=8, per_device_train_batch_size=8,
        learning_rate=1e-2, logging_steps=4, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, measure_cost=False,
    )  # fmt: skip
    values.update(overrides)
    return DistillConfig(**values)


@pytest.fixture(scope="module")
def corpus(tokenizer):
    args = DataArguments(
        dataset=str(DATA / "corpus_train.jsonl"), max_train_samples=200, max_length=64, eval_fraction=0.0
    )
    return build_datasets(args, tokenizer)[0]


def lora_trainer(config, corpus, tokenizer, args, callbacks=None):
    set_seed(0)  # the same LoRA initialisation in every run
    return DistillTrainer(
        model=adapters.load_student(args, config),
        teacher=load_model(TEACHER),
        args=config,
        train_dataset=corpus,
        processing_class=tokenizer,
        data_collator=Collator(tokenizer.pad_token_id),
        callbacks=callbacks,
    )


@pytest.fixture(scope="module", params=[False, True], ids=["lora", "dora"])
def distilled(request, tmp_path_factory, corpus, tokenizer):
    """A LoRA (and a DoRA) student distilled for a few steps, saved, with its weights from before."""
    out = tmp_path_factory.mktemp("dora" if request.param else "lora")
    trainer = lora_trainer(distill_config(out), corpus, tokenizer, lora_args(use_dora=request.param))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    trainer.save_model(str(out))
    return trainer, before, out


def is_adapter_weight(name: str) -> bool:
    return any(part in name for part in ("lora_A", "lora_B", "lora_magnitude_vector"))


def test_only_adapter_weights_train_and_base_weights_stay_bitwise_equal(distilled):
    trainer, before, _ = distilled
    after = dict(trainer.model.named_parameters())
    assert before.keys() == after.keys()
    assert {n for n, p in after.items() if p.requires_grad} == {n for n in after if is_adapter_weight(n)}
    for name, weight in after.items():
        if is_adapter_weight(name):
            if "lora_B" in name:  # initialised to zero, so any training moves it
                assert not torch.equal(weight, before[name]), f"{name} did not train"
        else:
            assert torch.equal(weight, before[name]), f"base weight {name} changed"


def test_the_adapter_is_saved_in_peft_format_and_is_a_small_fraction_of_the_model(distilled):
    trainer, _, out = distilled
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    adapter_bytes = (out / "adapter_model.safetensors").stat().st_size
    model_bytes = sum(f.stat().st_size for f in (DATA.parent / "student").glob("*.safetensors"))
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    # The file holds the trainable weights in fp32 and a small JSON header, nothing of the base.
    assert 4 * trainable <= adapter_bytes < 4 * trainable + 16_384
    assert adapter_bytes < 0.1 * model_bytes
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


@torch.no_grad()
def logits(model, tokenizer):
    batch = tokenizer(["The capital of Zorvia is", "7 plus 5 is 12. Counting up"], return_tensors="pt", padding=True)
    return model.eval()(**batch).logits.float()


def test_peft_loads_the_saved_adapter_back_to_the_trained_model(distilled, tokenizer):
    trainer, _, out = distilled
    reloaded = PeftModel.from_pretrained(load_model(STUDENT), str(out))
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(trainer.model, tokenizer), atol=1e-6, rtol=0)


def test_merge_writes_a_plain_transformers_model_with_the_adapter_models_logits(distilled, tokenizer, tmp_path, capsys):
    _, _, out = distilled
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    assert "full model saved to" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no peft
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(is_adapter_weight(k) or "base_layer" in k for k in merged.state_dict())
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    with_adapter = PeftModel.from_pretrained(load_model(STUDENT), str(out))
    expected = logits(with_adapter, tokenizer)
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(load_model(STUDENT), tokenizer), expected, atol=1e-3), "the adapter did nothing"


FAMILIES = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL),
    "gpt2": lambda: GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
}
SMALL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_adapts_every_linear_layer_except_the_output_head(family):
    """GPT-2's projections are transformers' Conv1D, not nn.Linear; they count as linear too."""
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    head = next(name for name, m in model.named_modules() if m is model.get_output_embeddings())
    linear = {name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    assert len(linear) > 2 * 4
    wrapped = adapters.get_peft_model(model, adapters.lora_config(lora_args()))
    adapted = {
        name.removeprefix("base_model.model.") for name, m in wrapped.named_modules() if isinstance(m, LoraLayer)
    }
    assert adapted == linear - {head}
    ids = torch.randint(0, 128, (2, 16))
    wrapped.train()(input_ids=ids, labels=ids).loss.backward()
    for name, p in wrapped.named_parameters():
        assert (p.grad is not None) == is_adapter_weight(name), name


def test_resuming_an_interrupted_lora_run_ends_with_the_uninterrupted_runs_adapter(tmp_path, corpus, tokenizer):
    """Dropout on, so the restored RNG state matters as much as the adapter, optimizer and scheduler."""
    args = lora_args(lora_dropout=0.1)
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear")

    def adapter_weights(trainer):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    whole = lora_trainer(distill_config(tmp_path / "whole", **settings), corpus, tokenizer, args)
    whole.train()

    config = distill_config(tmp_path / "cut", **settings)
    cut = lora_trainer(config, corpus, tokenizer, args, callbacks=[StopAt(3)])
    cut.train()
    assert cut.state.global_step == 3 and (tmp_path / "cut" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    resumed = lora_trainer(config, corpus, tokenizer, args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    expected, got = adapter_weights(whole), adapter_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


BASE = {
    "train": {"teacher_model_name_or_path": TEACHER, "dataset": DATA / "corpus_train.jsonl"},
    "finetune": {"dataset": DATA / "domain_train.jsonl"},
}


def run_cli(command, tmp_path, capsys, **changes):
    values = {"model_name_or_path": STUDENT, **BASE[command], "use_peft": "true", "max_steps": 1, "use_cpu": "true"}
    values.update(output_dir=tmp_path / "out", **changes)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    code = main([command, str(recipe)])
    err = capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "the error came after training had started"
    return code, err


BAD_SETTINGS = {
    "no-match": ({"lora_target_modules": "attn_proj"}, ["lora_target_modules ['attn_proj']", "q_proj, up_proj"]),
    "rank-0": ({"lora_r": 0}, ["lora_r must be a positive integer (the adapter rank), got 0"]),
    "alpha": ({"lora_alpha": -8}, ["lora_alpha must be > 0"]),
    "dropout": ({"lora_dropout": 1.0}, ["lora_dropout must be in [0, 1)"]),
    "qlora-no-cuda": ({"load_in_4bit": "true"}, ["QLoRA", "needs a CUDA GPU and the bitsandbytes package"]),
    "dora-without-peft": ({"use_peft": "false", "use_dora": "true"}, ["use_dora", "set use_peft: true"]),
    "all-linear-plus": ({"lora_target_modules": "[all-linear, embed_tokens]"}, ["all-linear stands alone"]),
    "modules-to-save": ({"lora_modules_to_save": "embed_token"}, ["'embed_token' names no module"]),
}


@pytest.mark.parametrize("command", ["train", "finetune"])
@pytest.mark.parametrize("name", BAD_SETTINGS)
def test_bad_adapter_settings_fail_in_one_line_before_any_weight_loads(command, name, tmp_path, capsys, monkeypatch):
    # No CUDA here whatever the machine, and any weight loading is a failure of the spec.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_loading(*args, **kwargs):
        raise AssertionError("model weights were loaded before the adapter settings were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    changes, needles = BAD_SETTINGS[name]
    code, err = run_cli(command, tmp_path, capsys, **changes)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"distill {command}: error:")
    for needle in needles:
        assert needle in err, err


def test_an_adapter_folder_given_as_the_model_says_to_merge_it_first(distilled, tmp_path, capsys):
    _, _, out = distilled
    code, err = run_cli("finetune", tmp_path, capsys, model_name_or_path=out)
    assert code == 2 and "holds a LoRA adapter" in err and "distill merge" in err
