"""Cost units, the `distill cost` plan, and the training callback (distill.cost)."""

import json
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, default_data_collator

from distill import cli
from distill.config import DistillConfig
from distill.cost import PFLOPS_DAY, CostCallback, find_peak, pflops_days
from distill.flops import FlopMeter, ModelSize, model_size
from distill.planner import plan, training_flops
from distill.trainer import DistillTrainer

from conftest import StopAt

GPT3 = ModelSize("GPT-3", 174.6e9)

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TINY_TEACHER = {**TINY, "hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 6}


def test_one_pflops_day_is_8_64e19_flops():
    assert PFLOPS_DAY == 1e15 * 24 * 3600 == 8.64e19
    assert pflops_days(3 * 8.64e19) == pytest.approx(3)


def test_gpt3_pretraining_is_3640_pflops_days():
    """6 x 174.6e9 parameters x 300e9 tokens (Brown et al. 2020, table D.1: 3.64e3 PFlop/s-days)."""
    p = plan(GPT3, 300e9)
    assert p["pflops_days"]["total"] == pytest.approx(3640, rel=0.01)


def test_servers_needed_within_a_deadline_round_up():
    """3,640 PFlop/s-days on servers sustaining 5 PFlop/s: 243 servers for 3 days, 146 for 5, 73 for 10."""
    p = plan(GPT3, 300e9, server_pflops=5, days=(3, 5, 10))
    assert [s["servers"] for s in p["servers"]] == [243, 146, 73]
    for s in p["servers"]:  # enough, and one fewer would not be
        assert s["servers"] * 5 * s["days"] >= p["pflops_days"]["total"] > (s["servers"] - 1) * 5 * s["days"]


def test_gpu_hours_and_dollars_follow_peak_mfu_and_price():
    p = plan(GPT3, 300e9, accelerator="A100", mfu=0.5, price=2.0)
    hours = 6 * 174.6e9 * 300e9 / (312e12 * 0.5) / 3600
    assert p["peak_tflops"] == 312
    assert p["gpu_hours"] == pytest.approx(hours)
    assert p["cost_usd"] == pytest.approx(2.0 * hours)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("h100-pcie", "H100 PCIe"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A800-SXM4-80GB", "A800"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10G", None),  # not the A10, and not an A100
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ],
)
def test_accelerator_names_find_their_peak(name, expected):
    found = find_peak(name)
    assert (found[0] if found else None) == expected


def test_unknown_accelerator_is_a_value_error():
    with pytest.raises(ValueError, match="peak"):
        plan(GPT3, 1e9, accelerator="TPU v9")


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_per_token_are_read_from_a_config_without_weights(tmp_path, tied):
    """Linear weights, output layer included, counted once when tied to the embedding."""
    c = LlamaConfig(**TINY, tie_word_embeddings=tied)
    c.save_pretrained(tmp_path)
    d, ff, hd = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads
    per_layer = 2 * d * d + 2 * d * c.num_key_value_heads * hd + 3 * d * ff
    expected = c.num_hidden_layers * per_layer + d * c.vocab_size
    for spec in (tmp_path, tmp_path / "config.json"):
        size = model_size(str(spec))
        assert (size.params, size.layers, size.attn_width) == (expected, c.num_hidden_layers, d)


def test_counts_are_parsed_with_suffixes():
    assert model_size("135M").params == 135e6
    assert model_size("1.7B").params == 1.7e9
    assert model_size("174.6e9").params == 174.6e9


def test_a_missing_model_path_is_a_value_error(tmp_path):
    with pytest.raises(ValueError):
        model_size(str(tmp_path / "nope"))


def test_plan_equals_the_measured_flops_of_a_distillation_step(tmp_path):
    """The analytic 3 x (2N + 4Lsd) student + (2N + 4Lsd) teacher per token is what the meter measures."""
    batch, seq = 2, 24
    models = {}
    for role, cfg in (("student", TINY), ("teacher", TINY_TEACHER)):
        LlamaConfig(**cfg).save_pretrained(tmp_path / role)
        torch.manual_seed(0)
        models[role] = LlamaForCausalLM(LlamaConfig(**cfg))
    ids = torch.randint(0, 64, (batch, seq))
    meter = FlopMeter()
    with meter.measure("student", {"input_ids": ids}):
        with torch.no_grad(), meter.measure("teacher", {"input_ids": ids}):
            models["teacher"](input_ids=ids)
        models["student"](input_ids=ids, labels=ids).loss.backward()

    analytic = training_flops(
        model_size(str(tmp_path / "student")), batch * seq, seq, model_size(str(tmp_path / "teacher"))
    )
    assert meter.flops["student"] == pytest.approx(analytic["student"], rel=1e-9)
    assert meter.flops["teacher"] == pytest.approx(analytic["teacher"], rel=1e-9)


def test_distillation_pays_for_itself_when_the_savings_equal_its_cost():
    student, teacher = ModelSize("s", 135e6, 30, 576), ModelSize("t", 1.7e9, 24, 2048)
    p = plan(student, 2e9, teacher, seq_len=2048, mfu=0.3, price=2.5)
    tokens = p["inference"]["breakeven_tokens"]
    saved = (p["inference"]["teacher"]["usd"] - p["inference"]["student"]["usd"]) * tokens / 1000
    assert saved == pytest.approx(p["cost_usd"])
    assert plan(teacher, 1e9, student)["inference"]["breakeven_tokens"] is None  # a bigger "student" never pays


def run_cli(capsys, *argv):
    code = cli.main(["cost", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cost_command_prints_the_table_and_json(capsys):
    code, table, _ = run_cli(capsys, "--student", "174.6e9", "--tokens", "300e9")
    assert code == 0
    assert "243 for 3 days, 146 for 5 days, 73 for 10 days" in table
    code, out, _ = run_cli(capsys, "--student", "174.6e9", "--tokens", "300e9", "--json")
    p = json.loads(out)
    assert p["pflops_days"]["total"] == pytest.approx(3640, rel=0.01)
    assert [s["servers"] for s in p["servers"]] == [243, 146, 73]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--student", "1B", "--tokens", "lots"], "--tokens"),
        (["--student", "1B", "--tokens", "1B", "--accelerator", "abacus"], "unknown accelerator"),
        (["--student", "1B", "--tokens", "1B", "--mfu", "40"], "mfu"),
        (["--student", "./no/such/model", "--tokens", "1B"], "not found"),
    ],
)
def test_cost_command_reports_user_errors(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err


# ---------------------------------------------------------------------------------------------------
# The callback inside a real DistillTrainer run.


def train(output_dir, max_steps=4, resume=None, stop_at=None, callbacks=(), prompts=False, **config):
    """A short DistillTrainer run on random 16-token rows; ``prompts``: each row's first 1..12 tokens
    are a prompt (-100), so batches of one shape hold different numbers of target tokens."""
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(16):
        ids = torch.randint(0, 64, (16,), generator=g)
        labels = ids.clone()
        if prompts:
            labels[: 1 + i % 12] = -100
        data.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(16, dtype=torch.long)})
    args = DistillConfig(
        output_dir=str(output_dir),
        teacher_model_name_or_path="in-memory",
        max_steps=max_steps,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        **config,
    )
    models = []
    for cfg in (TINY, TINY_TEACHER):
        torch.manual_seed(0)
        models.append(LlamaForCausalLM(LlamaConfig(**cfg)))
    trainer = DistillTrainer(
        model=models[0],
        teacher=models[1],
        args=args,
        train_dataset=data,
        data_collator=default_data_collator,
        callbacks=[*callbacks, *([StopAt(stop_at)] if stop_at else [])],
    )
    trainer.train(resume_from_checkpoint=resume)
    report = output_dir / "cost_report.json"
    return trainer, json.loads(report.read_text()) if report.exists() else None


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("full"), peak_tflops=1.0, gpu_hour_price=3.0)


@pytest.mark.parametrize("chunked", [True, False])
def test_teacher_flops_are_counted_and_included(full_run, tmp_path, chunked):
    """4 steps of 2 x 16 tokens: the teacher's forward and the student's forward + backward, as the
    analytic per-token counts say; the total is their sum, logged and reported.

    The chunked loss runs the output layers inside the loss, on target rows only (plus the last
    position's logits): the teacher's share is moved to the teacher exactly, and the student's count
    differs from the all-positions formula by those few rows.
    """
    trainer, report = full_run if chunked else train(tmp_path, peak_tflops=1.0, chunked_loss=False)
    assert trainer._chunked == chunked
    tokens = 4 * 2 * 16
    sizes = [ModelSize("", *_llama_size(LlamaConfig(**c))) for c in (TINY, TINY_TEACHER)]
    expected = training_flops(sizes[0], tokens, 16, sizes[1])
    assert report["flops"]["teacher"] == expected["teacher"] > 0
    assert report["flops"]["student"] == pytest.approx(expected["student"], rel=0.01 if chunked else 0)
    assert report["flops"]["total"] == report["flops"]["teacher"] + report["flops"]["student"]
    assert report["tokens"] == tokens
    last = [h for h in trainer.state.log_history if "flops_total" in h][-1]
    assert last["flops_teacher"] == expected["teacher"] and last["flops_total"] == report["flops"]["total"]
    assert 0 < last["mfu"]


def _llama_size(c):
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    per_layer = 2 * d * d + 2 * d * c.num_key_value_heads * hd + 3 * d * c.intermediate_size
    return c.num_hidden_layers * per_layer + d * c.vocab_size, c.num_hidden_layers, d


def test_report_rates_follow_from_its_totals(full_run):
    _, r = full_run
    assert r["pflops_days"]["total"] == pytest.approx(r["flops"]["total"] / 8.64e19)
    assert r["mfu"] == pytest.approx(r["flops"]["total"] / r["wall_seconds"] / 1e12)
    assert r["cost_usd"] == pytest.approx(3.0 * r["wall_seconds"] / 3600)


def test_evaluation_is_not_training_compute(full_run):
    trainer, _ = full_run
    before = dict(trainer.cost.meter.flops)
    trainer.evaluate(eval_dataset=trainer.train_dataset)
    assert trainer.cost.meter.flops == before


@pytest.mark.slow
@pytest.mark.parametrize("restore_flag", [False, True])
def test_a_resumed_run_continues_the_count(tmp_path, full_run, restore_flag):
    """Stopped after the step-2 checkpoint and resumed from it, the run reports what the uninterrupted
    run reports (whether or not the Trainer rebuilds the callback from the checkpoint)."""
    _, uninterrupted = full_run
    flag = {"restore_callback_states_from_checkpoint": restore_flag}
    _, first = train(tmp_path, stop_at=2, **flag)
    assert first["flops"]["total"] == uninterrupted["flops"]["total"] / 2
    _, resumed = train(tmp_path, resume=str(tmp_path / "checkpoint-2"), **flag)
    assert resumed["flops"] == uninterrupted["flops"]
    assert resumed["tokens"] == uninterrupted["tokens"]
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert resumed["wall_seconds"] > saved["stateful_callbacks"]["CostCallback"]["attributes"]["totals"]["seconds"]


def test_the_meter_can_be_turned_off(tmp_path):
    trainer, report = train(tmp_path, max_steps=1, measure_cost=False)
    assert trainer.cost is None and report is None
    assert not any("flops_total" in h for h in trainer.state.log_history)


def test_batches_of_one_shape_are_measured_once_whatever_their_target_counts(tmp_path, monkeypatch):
    """Prompt/completion batches: one shape, a different number of target rows in each. The chunked
    loss's output layers scale with the rows, so the meter measures once and scales; the total equals
    a count that measures every block of every step."""
    trainer, report = train(tmp_path / "once", max_steps=6, prompts=True)
    assert trainer._chunked and trainer.cost.meter.measurements == 1

    measure = FlopMeter.measure

    def measure_always(self, *args, **kwargs):
        self._known.clear()
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(FlopMeter, "measure", measure_always)
    trainer, exact = train(tmp_path / "every", max_steps=6, prompts=True)
    assert trainer.cost.meter.measurements == 6
    assert exact["flops"] == report["flops"]


def test_activation_checkpointing_recompute_is_hardware_flops_not_model_flops(tmp_path):
    """MFU is defined on model FLOPs (PaLM, app. B): recomputing checkpointed layers in backward is
    work the hardware does, reported apart as hardware FLOPs (HFU), not as model FLOPs."""
    _, plain = train(tmp_path / "plain", max_steps=2, peak_tflops=1.0)
    _, checkpointed = train(tmp_path / "checkpointed", max_steps=2, peak_tflops=1.0, activation_checkpointing=True)
    assert checkpointed["flops"] == plain["flops"]
    assert plain["hardware_flops"]["recomputed"] == 0
    assert plain["hardware_flops"]["total"] == plain["flops"]["total"]
    # each decoder layer's forward runs once more: a third of the layers' forward + backward
    recomputed = checkpointed["hardware_flops"]["recomputed"]
    assert 0.1 * checkpointed["flops"]["student"] < recomputed < checkpointed["flops"]["student"] / 3
    assert checkpointed["hardware_flops"]["total"] == checkpointed["flops"]["total"] + recomputed
    assert checkpointed["hfu"] / checkpointed["mfu"] == pytest.approx(
        checkpointed["hardware_flops"]["total"] / checkpointed["flops"]["total"]
    )


def test_a_teacher_reading_more_tokens_per_token_is_planned_on_them():
    """`--teacher_tokens_per_token r` (a teacher with another tokenizer): the teacher's forward runs on
    r x the tokens in sequences r x as long; the student's line does not change; r = 1 is the plain plan."""
    from distill.flops import forward_flops

    student = ModelSize("s", 1e8, 12, 768)
    teacher = ModelSize("t", 7e9, 28, 3584)
    one = plan(student, 1e9, teacher, seq_len=1024)
    more = plan(student, 1e9, teacher, seq_len=1024, teacher_ratio=1.35)
    assert more["flops"]["student"] == one["flops"]["student"]
    assert one["flops"]["teacher"] == forward_flops(teacher, 1e9, 1024)
    assert more["flops"]["teacher"] == pytest.approx(forward_flops(teacher, 1.35e9, 1.35 * 1024), rel=1e-12)
    assert more["flops"]["teacher"] > 1.35 * one["flops"]["teacher"]  # longer sequences: more attention per token
    printed = cli.main(
        ["cost", "--student", "135M", "--teacher", "7B", "--tokens", "1B", "--teacher_tokens_per_token", "0"]
    )
    assert printed == 2


def test_output_layers_counted_on_their_own_are_not_taken_for_a_model_without_attention():
    """An output layer alone (a cross-tokenizer teacher's rows, the chunked loss's heads) has no attention to
    miss: counted first and outermost, it warns of nothing, and it is billed per row."""
    head, rows = torch.nn.Linear(8, 32, bias=False), torch.randn(5, 8)
    cost = CostCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with cost.teacher_rows(len(rows), (8, 32)):
            head(rows)
        with cost.output_layers(len(rows), (8, 32)):
            head(rows)
    assert cost.meter.flops["teacher"] == cost.meter.flops["student"] == 2 * 5 * 8 * 32
