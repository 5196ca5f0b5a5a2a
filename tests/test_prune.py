"""`distill prune`: importance picks the units that matter least, the surgery removes exactly them,
and the student folder is a model every other job takes."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from distill import importance as imp
from distill import prune
from distill.data import Collator
from distill.errors import UserError

from conftest import DATA, ROOT, TEACHER


@pytest.fixture(scope="module")
def teacher():
    return AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batches(tokenizer):
    rows = [json.loads(line)["text"] for line in (DATA / "corpus_eval.jsonl").read_text().splitlines()[:12]]
    collate = Collator(tokenizer.pad_token_id)
    out = []
    for i in range(0, len(rows), 4):  # rows of different lengths: padding is in every batch
        ids = [tokenizer(t)["input_ids"][:48] for t in rows[i : i + 4]]
        out.append(collate([{"input_ids": x, "labels": x} for x in ids]))
    return out


def pruned(model, batches, method="block_influence", **shape):
    """The student of ``shape`` (unset keys: the teacher's) and what was kept."""
    config = model.config
    target = prune.target_shape(config, shape)
    removed = config.num_hidden_layers - target["num_hidden_layers"]
    scores = imp.calibrate(model, batches, block=removed or None, progress=False)
    removal = imp.loss_on_removal(model, batches, progress=False) if method == "loss_on_removal" else None
    if method == "contiguous" and not removed:
        scores.block_distance = torch.zeros(1)
    keep = prune.choose(scores, config, target, method, removal)
    student = prune.build_student(model, prune.student_config(config, target, keep["layers"]), keep)
    return student.eval(), keep, scores


def logits(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[batch["attention_mask"].bool()]


def tiny(model_type, **extra):
    """A random-weights model of ``model_type`` at the tiny teacher's size (GQA: 4 query, 2 KV heads)."""
    config = AutoConfig.for_model(
        model_type, vocab_size=960, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norm weights off 1, so that slicing the wrong channels of them shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model


# ---------------------------------------------------------------------------------------------------
# Surgery


@pytest.mark.parametrize("method", ["block_influence", "loss_on_removal", "contiguous"])
def test_keeping_every_unit_gives_the_teachers_logits(teacher, batches, method):
    student, keep, _ = pruned(teacher, batches, method)
    assert keep["layers"] == [0, 1, 2, 3]
    for batch in batches:
        torch.testing.assert_close(logits(student, batch), logits(teacher, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_families_keep_the_teachers_logits_and_prune_to_a_model_that_runs(model_type, batches):
    model = tiny(model_type)
    names = {n for n, _ in model.named_parameters()}
    assert model_type != "qwen2" or "model.layers.0.self_attn.q_proj.bias" in names  # biases are sliced
    assert model_type != "qwen3" or "model.layers.0.self_attn.q_norm.weight" in names  # q_norm is kept
    same, _, _ = pruned(model, batches)
    torch.testing.assert_close(logits(same, batches[0]), logits(model, batches[0]), atol=1e-6, rtol=0)

    small, keep, _ = pruned(model, batches, num_hidden_layers=2, hidden_size=32, intermediate_size=40,
                            num_attention_heads=2)  # fmt: skip
    c = small.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (2, 32, 40)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 16)
    out = logits(small, batches[0])
    assert out.shape[-1] == 960 and torch.isfinite(out).all()


def test_a_zero_kv_group_is_pruned_first_and_removing_it_changes_nothing(batches):
    """A key/value group whose values are all zero contributes nothing: it is the group removed, and
    the student computes exactly what the teacher computes (qwen2: the value bias too)."""
    model = tiny("qwen2")
    d = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[d : 2 * d] = 0  # KV group 1: query heads 2 and 3
            layer.self_attn.v_proj.bias[d : 2 * d] = 0
    student, keep, scores = pruned(model, batches, num_key_value_heads=1)
    assert keep["kv"] == [[0], [0], [0]] and keep["heads"] == [[0, 1]] * 3
    assert (scores.heads[:, 2:] == 0).all() and (scores.heads[:, :2] > 0).all()
    torch.testing.assert_close(logits(student, batches[1]), logits(model, batches[1]), atol=1e-5, rtol=0)


def test_a_dead_mlp_neuron_is_pruned_first_and_removing_it_changes_nothing(teacher, batches):
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[7] = 0  # act(gate) * up = 0 for neuron 7 of every layer
    student, keep, scores = pruned(model, batches, intermediate_size=351)
    assert (scores.neurons[:, 7] == 0).all() and (scores.neurons.sum(dim=0) > 0).sum() == 351
    assert all(7 not in kept and len(kept) == 351 for kept in keep["neurons"])
    torch.testing.assert_close(logits(student, batches[0]), logits(model, batches[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["block_influence", "loss_on_removal"])
def test_a_layer_that_is_an_identity_is_the_first_pruned(teacher, batches, method):
    """Layer 2 with zeroed output projections returns its input: Block Influence 0, loss increase 0.
    Removing it gives the same model."""
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    student, keep, scores = pruned(model, batches, method, num_hidden_layers=3)
    assert keep["layers"] == [0, 1, 3]
    assert scores.block_influence[2] == pytest.approx(0, abs=1e-6) and (scores.block_influence[[0, 1, 3]] > 0.01).all()
    torch.testing.assert_close(logits(student, batches[0]), logits(model, batches[0]), atol=1e-5, rtol=0)


def test_contiguous_removal_drops_the_run_of_layers_that_changes_the_hidden_state_least(teacher, batches):
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        for i in (1, 2):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    _, keep, scores = pruned(model, batches, "contiguous", num_hidden_layers=2)
    assert keep["layers"] == [0, 3]
    assert int(torch.argmin(scores.block_distance)) == 1 and scores.block_distance[1] == pytest.approx(0, abs=1e-3)


def test_block_influence_counts_real_tokens_only(teacher, batches):
    """Padding rows do not move the scores: a batch padded wider scores like the unpadded one."""
    batch = batches[0]
    wide = {k: torch.nn.functional.pad(v, (0, 16), value=0 if k != "labels" else -100) for k, v in batch.items()}
    a = imp.calibrate(teacher, [batch], progress=False)
    b = imp.calibrate(teacher, [wide], progress=False)
    assert a.tokens == b.tokens == int(batch["attention_mask"].sum())
    torch.testing.assert_close(a.block_influence, b.block_influence, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.channels, b.channels, rtol=1e-4, atol=0)


def test_the_scores_match_their_definitions_computed_directly(teacher, batches):
    """BI from output_hidden_states; neuron scores from the MLP recomputed by hand (float64 sums)."""
    scores = imp.calibrate(teacher, batches, progress=False)
    cos, absolute, n = torch.zeros(4, dtype=torch.float64), torch.zeros(352, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            mask = batch["attention_mask"].bool()
            hs = teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            ).hidden_states
            for i in range(3):  # the last entry of hidden_states is after the final norm
                cos[i] += torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)[mask].double().sum()
            mlp, x = teacher.model.layers[0].mlp, teacher.model.layers[0].post_attention_layernorm
            h = hs[0] + teacher.model.layers[0].self_attn(
                teacher.model.layers[0].input_layernorm(hs[0]), attention_mask=None,
                position_embeddings=teacher.model.rotary_emb(hs[0], torch.arange(hs[0].shape[1])[None]),
            )[0]  # fmt: skip
            act = mlp.act_fn(mlp.gate_proj(x(h))) * mlp.up_proj(x(h))
            # causal attention: a right-padded row's real positions never see its padding
            absolute += act.abs()[mask].double().sum(dim=0)
            n += int(mask.sum())
    torch.testing.assert_close(scores.block_influence[:3], 1 - cos[:3] / n, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.neurons[0], absolute / n, rtol=1e-4, atol=1e-7)


def test_tied_embeddings_stay_tied(tmp_path, batches):
    model = tiny("llama", tie_word_embeddings=True)
    student, _, _ = pruned(model, batches, hidden_size=48)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded, batches[0]), logits(student, batches[0]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ({"num_hidden_layers": 5}, "num_hidden_layers 5 is more than the teacher's 4"),
        ({"hidden_size": 256}, "hidden_size 256 is more than the teacher's 128"),
        ({"hidden_size": 90}, "num_attention_heads 4 does not divide hidden_size 90"),
        ({"num_attention_heads": 3, "num_key_value_heads": 2}, "num_key_value_heads 2 does not divide"),
        ({"num_attention_heads": 3}, "choose a multiple of 2"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "set num_key_value_heads to at least 2"),
    ],
)
def test_a_shape_pruning_cannot_make_is_refused_before_any_model_loads(tmp_path, monkeypatch, shape, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("distill.models.load_model", no_loading)
    monkeypatch.setattr("distill.data.build_datasets", no_loading)
    path = tmp_path / "r.yaml"
    recipe = {"teacher_model_name_or_path": TEACHER, "dataset": str(DATA / "corpus_train.jsonl"),
              "output_dir": str(tmp_path / "out"), **shape}  # fmt: skip
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match=message):
        prune.run(str(path))


def test_an_unsupported_family_is_one_clear_line_from_the_cli(tmp_path):
    """A config-only folder (no weights at all): the refusal cannot have loaded a model."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2).save_pretrained(folder)
    done = subprocess.run(
        [sys.executable, "-m", "distill.cli", "prune", str(ROOT / "recipes/tiny_cpu_prune.yaml"),
         "--teacher_model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a 'gpt2' model; distill prune knows llama, mistral, qwen2, qwen3" in lines[0]


# ---------------------------------------------------------------------------------------------------
# The job and what its folder is good for


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "student"
    report = prune.run(
        str(ROOT / "recipes/tiny_cpu_prune.yaml"),
        ["--output_dir", str(out), "--calibration_samples", "60", "--depth_importance", "loss_on_removal"],
    )
    return out, report


def test_the_job_writes_a_loadable_student_and_a_report(pruned_folder):
    out, report = pruned_folder
    saved = json.loads((out / "prune_report.json").read_text())
    assert saved["layer_map"] == saved["kept"]["layers"] and len(saved["layer_map"]) == 2
    assert len(saved["importance"]["loss_on_removal"]) == 4 and len(saved["importance"]["intermediate"]) == 4
    assert saved["parameters"]["student"] == AutoModelForCausalLM.from_pretrained(out).num_parameters()
    assert saved["perplexity"]["teacher"] < saved["perplexity"]["student"]
    cost = saved["cost"]
    assert cost["flops"]["total"] == sum(v for k, v in cost["flops"].items() if k != "total") > 0
    assert cost["pflops_days"]["total"] == pytest.approx(cost["flops"]["total"] / 8.64e19)
    assert (out / "prune_report.md").is_file() and (out / "tokenizer.json").is_file()


def test_the_job_refuses_to_overwrite_a_student(pruned_folder):
    out, _ = pruned_folder
    with pytest.raises(UserError, match="already holds a model"):
        prune.run(str(ROOT / "recipes/tiny_cpu_prune.yaml"), ["--output_dir", str(out)])


@pytest.mark.parametrize("lora", [False, True])
def test_the_pruned_student_trains_with_distill_train(pruned_folder, tmp_path, lora):
    from distill import train

    out, _ = pruned_folder
    overrides = ["--model_name_or_path", str(out), "--output_dir", str(tmp_path / "run"), "--max_steps", "3",
                 "--per_device_train_batch_size", "4", "--max_train_samples", "40", "--max_eval_samples", "8",
                 "--save_steps", "100", "--logging_steps", "1", "--use_peft", str(lora).lower()]  # fmt: skip
    metrics = train.run(str(ROOT / "recipes/tiny_cpu.yaml"), overrides)
    assert (
        metrics["global_step"] == 3 and metrics["eval"]["eval_kd_loss"] < metrics["eval_before"]["eval_before_kd_loss"]
    )
    assert (tmp_path / "run" / ("adapter_config.json" if lora else "model.safetensors")).is_file()
