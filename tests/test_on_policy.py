"""On-policy distillation (distill.on_policy, `lmbda`): the student samples, the teacher grades every
sampled token, and nothing else about a run changes."""

import copy
import json

import pytest
import torch

from distill import cli
from distill.config import DataArguments, DistillConfig
from distill.data import Collator, build_datasets
from distill.flops import model_size, sampling_flops
from distill.models import load_model
from distill.on_policy import prompts_of, sample, sample_quality, step_seed, stop_ids
from distill.trainer import DistillTrainer

from conftest import DATA, ROOT, STUDENT, TEACHER, StopAt


@pytest.fixture(scope="module")
def domain(tokenizer):
    """Question/answer prompt + completion rows: train, held out."""
    args = DataArguments(dataset=str(DATA / "domain_train.jsonl"), eval_dataset=str(DATA / "domain_eval.jsonl"),
                         max_length=64)  # fmt: skip
    return build_datasets(args, tokenizer)


def make_trainer(tmp_path, data, tokenizer, student=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), teacher_model_name_or_path=TEACHER, use_cpu=True, report_to="none",
        max_steps=4, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=2, save_strategy="no",
        disable_tqdm=True, seed=0, warmup_steps=0, max_new_tokens=12, lmbda=1.0, alpha=1.0, loss_type="reverse_kl",
    )  # fmt: skip
    values.update(overrides)
    return DistillTrainer(
        model=student or load_model(STUDENT), teacher=load_model(TEACHER), args=DistillConfig(**values),
        train_dataset=data[0], processing_class=tokenizer, data_collator=Collator(tokenizer.pad_token_id),
    )  # fmt: skip


def reference_loss(student, teacher, batch, alpha, temperature, num_items):
    """alpha T^2 KL(p_S || p_T) + (1 - alpha) CE over the target positions, written plainly in float64."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = student(**inputs).logits.double()[:, :-1]
    t = teacher(**inputs).logits.double()[:, :-1].detach()
    s, t = s[..., : min(s.shape[-1], t.shape[-1])], t[..., : min(s.shape[-1], t.shape[-1])]  # the shared ids
    y = batch["labels"][:, 1:]
    keep = y != -100
    log_s, log_t = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)[keep].sum()
    ce = torch.nn.functional.cross_entropy(s[keep], y[keep], reduction="sum")
    return (alpha * temperature**2 * kl + (1 - alpha) * ce) / num_items


@pytest.mark.parametrize("chunked", [True, False])
def test_an_on_policy_batch_is_graded_on_the_sampled_tokens_only(tmp_path, domain, tokenizer, chunked):
    """The batch the step trains on holds each prompt followed by the student's own sample (the one
    its seed draws), with targets on the sampled tokens only; its loss and every gradient equal a
    float64 reference that treats the samples as constants: no gradient flows through sampling."""
    trainer = make_trainer(tmp_path, domain, tokenizer, chunked_loss=chunked, alpha=0.7, temperature=2.0)
    assert trainer._chunked is chunked
    data = Collator(tokenizer.pad_token_id)([domain[0][i] for i in range(6)])
    (batch,), num_items = trainer.get_batch_samples(iter([data]), 1, torch.device("cpu"))

    prompts = prompts_of(data)
    samples = sample(trainer.model, prompts, pad_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id],
                        max_new_tokens=12, temperature=1.0, top_p=1.0, seed=step_seed(0, 0, 0, 1))  # fmt: skip
    for row, (prompt, completion) in enumerate(zip(prompts, samples, strict=True)):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {-100}
        assert [t for t in labels if t != -100] == completion == ids[len(prompt) : len(prompt) + len(completion)]
    assert int(num_items) == sum(map(len, samples))  # the loss's denominator counts the sampled tokens

    model = trainer.model
    model.train()
    reference_student = copy.deepcopy(model).double()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch), num_items_in_batch=num_items)
    loss.backward()
    want = reference_loss(reference_student, trainer.teacher.model.double(), batch, 0.7, 2.0, int(num_items))
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), reference_student.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_lmbda_0_is_the_off_policy_run_exactly(tmp_path, domain, tokenizer, monkeypatch):
    """With lmbda 0 the generation settings change nothing: no sampling, the same weights and logs."""
    import distill.trainer

    calls = []
    monkeypatch.setattr(distill.trainer, "sample", lambda *a, **k: calls.append(1))
    runs = {}
    for name, extra in (("plain", {}), ("lmbda0", {"max_new_tokens": 5, "generation_temperature": 0.5, "top_p": 0.9,
                                                   "generation_seed": 7})):  # fmt: skip
        trainer = make_trainer(tmp_path / name, domain, tokenizer, lmbda=0.0, loss_type="forward_kl", alpha=0.5,
                               **extra)  # fmt: skip
        trainer.train()
        runs[name] = trainer
    assert not calls
    a, b = (runs[n].model.state_dict() for n in ("plain", "lmbda0"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k} for h in runs[n].state.log_history]
            for n in ("plain", "lmbda0")]  # fmt: skip
    assert logs[0] == logs[1]


def test_a_resumed_on_policy_run_ends_with_the_uninterrupted_runs_weights(tmp_path, domain, tokenizer):
    """Which micro-batches are on-policy and what the student samples are drawn from the step, so a
    run stopped after its step-3 checkpoint and resumed samples, logs and trains what the whole run does."""
    common = {"lmbda": 0.5, "max_steps": 6, "save_strategy": "steps", "save_steps": 3, "logging_steps": 3}
    whole = make_trainer(tmp_path / "whole", domain, tokenizer, **common)
    whole.train()
    first = make_trainer(tmp_path / "resumed", domain, tokenizer, **common)
    first.add_callback(StopAt(3))
    first.train()
    resumed = make_trainer(tmp_path / "resumed", domain, tokenizer, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-3"))
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)

    def at_step_6(trainer):
        return next(h for h in trainer.state.log_history if h.get("step") == 6 and "loss" in h)

    for key in ("on_policy_share", "sampled_length", "sampled_reverse_kl", "loss"):
        assert at_step_6(resumed)[key] == pytest.approx(at_step_6(whole)[key], rel=1e-5), key


def test_sampling_is_billed_and_logged(tmp_path, domain, tokenizer):
    """The student's sampling is its own line of the bill, and the logs carry the on-policy share,
    the sampled completions' length and the teacher's reverse KL on them."""
    trainer = make_trainer(tmp_path, domain, tokenizer, lmbda=0.5, max_steps=4, logging_steps=4)
    trainer.train()
    report = json.loads((tmp_path / "out" / "cost_report.json").read_text())
    flops = report["flops"]
    assert flops["student_generation"] > 0
    assert flops["total"] == flops["teacher"] + flops["student"] + flops["student_generation"]
    log = next(h for h in trainer.state.log_history if "on_policy_share" in h)
    assert 0 < log["on_policy_share"] < 1
    assert 1 <= log["sampled_length"] <= 12
    assert log["sampled_reverse_kl"] > 0


@pytest.mark.parametrize(
    "override,message",
    [(["--lmbda", "1.5"], "lmbda must be in [0, 1]"), (["--lmbda", "1", "--alpha", "0"], "set alpha > 0"),
     (["--lmbda", "1", "--top_p", "0"], "top_p must be in (0, 1]"),
     (["--lmbda", "1", "--teacher_cache", "runs/nowhere"], "set teacher_model_name_or_path instead"),
     (["--lmbda", "1", "--max_length", "500", "--max_new_tokens", "16"],
      "max_length 500 + max_new_tokens 16 (a prompt and the student's sample) is more than the student")],
)  # fmt: skip
def test_on_policy_settings_that_cannot_work_are_refused_in_one_line(tmp_path, capsys, monkeypatch, override, message):
    monkeypatch.chdir(ROOT)
    code = cli.main(["train", "recipes/tiny_cpu.yaml", "--output_dir", str(tmp_path / "out"), *override])
    assert code == 2 and message in capsys.readouterr().err


def test_on_policy_on_text_data_is_refused_before_the_models_load(tmp_path, capsys, monkeypatch):
    """Packed text has no prompts to sample from."""
    import distill.adapters

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(distill.adapters, "load_student", lambda *a, **k: pytest.fail("a model was loaded"))
    code = cli.main(["train", "recipes/tiny_cpu.yaml", "--output_dir", str(tmp_path / "out"), "--lmbda", "1"])
    assert code == 2 and "needs prompts to sample from" in capsys.readouterr().err


def prompt_only_data(tmp_path):
    rows = [json.loads(line) for line in (DATA / "domain_train.jsonl").read_text().splitlines()[:24]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return str(path)


def test_a_prompt_only_dataset_trains_fully_on_policy(tmp_path, monkeypatch):
    """lmbda 1 samples every completion, so prompts alone are enough: every batch is the student's
    samples, graded on the sampled tokens."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    code = cli.main(["train", "recipes/tiny_cpu_on_policy.yaml", "--dataset", prompt_only_data(tmp_path),
                     "--max_steps", "2", "--logging_steps", "1", "--max_eval_samples", "4", "--output_dir", str(out)])  # fmt: skip
    assert code == 0
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logs) == 2 and all(h["on_policy_share"] == 1.0 and h["sampled_length"] >= 1 for h in logs)


@pytest.mark.parametrize(
    "override,message",
    [(["--lmbda", "0.5"], "only fully on-policy training (lmbda: 1) can use prompts alone"),
     (["--eval_dataset", "PROMPTS"], "Held-out data always needs completions")],
    ids=["mixed-lmbda", "prompt-only-eval"],
)  # fmt: skip
def test_a_prompt_only_dataset_is_refused_where_completions_are_needed(
    tmp_path, capsys, monkeypatch, override, message
):
    import distill.adapters

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(distill.adapters, "load_student", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = prompt_only_data(tmp_path)
    override = [prompts if value == "PROMPTS" else value for value in override]
    code = cli.main(["train", "recipes/tiny_cpu_on_policy.yaml", "--dataset", prompts,
                     "--output_dir", str(tmp_path / "out"), *override])  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_an_on_policy_student_writes_what_the_teacher_would_more_than_an_off_policy_one(tmp_path, domain, tokenizer):
    """The reason the mode exists. Same student, data, loss (reverse KL), steps and seed; only lmbda
    differs. Measured on the held-out prompts' sampled completions, scored by the teacher: at 150
    steps the on-policy student's reverse KL was 1.81 against 4.13, its teacher NLL 4.56 against 7.32."""
    held = Collator(tokenizer.pad_token_id)([domain[1][i] for i in range(len(domain[1]))])
    prompts, teacher = prompts_of(held), load_model(TEACHER)
    quality = {}
    for lmbda in (0.0, 1.0):
        trainer = make_trainer(tmp_path / str(lmbda), domain, tokenizer, lmbda=lmbda, max_steps=150,
                               per_device_train_batch_size=16, max_new_tokens=16, logging_steps=50)  # fmt: skip
        trainer.train()
        quality[lmbda] = sample_quality(trainer.model, teacher, prompts, pad_id=tokenizer.pad_token_id,
                                        eos_ids=[tokenizer.eos_token_id], max_new_tokens=16, seed=123)  # fmt: skip
    assert quality[1.0]["reverse_kl"] < 0.8 * quality[0.0]["reverse_kl"], quality
    assert quality[1.0]["teacher_nll"] < quality[0.0]["teacher_nll"], quality


def test_seeds_differ_by_step_micro_batch_and_process():
    seeds = {step_seed(0, s, m, 1, p) for s in range(20) for m in range(4) for p in range(2)}
    assert len(seeds) == 160 and step_seed(0, 3, 1, 1) == step_seed(0, 3, 1, 1) != step_seed(1, 3, 1, 1)


def test_each_process_samples_its_rows_with_its_own_seed(tmp_path, domain, tokenizer, monkeypatch):
    """Two data-parallel processes at the same step and micro-batch draw different samples: the seed
    the trainer samples with depends on the process (it did not: every process drew alike)."""
    trainer = make_trainer(tmp_path, domain, tokenizer)
    batch = Collator(tokenizer.pad_token_id)([domain[0][i] for i in range(2)])
    seeds = []
    monkeypatch.setattr(trainer, "_sample", lambda b, seed: seeds.append(seed) or b)
    for process in (0, 1):
        monkeypatch.setattr(type(trainer.accelerator), "process_index", property(lambda self, p=process: p))
        trainer.get_batch_samples(iter([batch]), 1, "cpu")
    assert len(seeds) == 2 and seeds[0] != seeds[1]


def test_samples_stop_at_every_stop_id_of_the_generation_config(tmp_path, domain, tokenizer):
    """An instruct model ends its turn with a token that is not the tokenizer's EOS (<|im_end|>,
    <|eot_id|>), listed in its generation_config: a sample ends there, not max_new_tokens later."""
    student = load_model(STUDENT)
    prompt = prompts_of(Collator(tokenizer.pad_token_id)([domain[0][0]]))
    first = sample(student, prompt, pad_id=tokenizer.pad_token_id, eos_ids=[], max_new_tokens=12,
                      temperature=1e-4, top_p=1.0, seed=0)  # fmt: skip
    end_of_turn = first[0][0]  # what the (near-greedy) student writes first: make it the end of its turn
    assert end_of_turn != tokenizer.eos_token_id and len(first[0]) == 12
    student.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    assert stop_ids(student, tokenizer) == [tokenizer.eos_token_id, end_of_turn]
    trainer = make_trainer(tmp_path, domain, tokenizer, student=student, generation_temperature=1e-4)
    sampled = trainer._sample(Collator(tokenizer.pad_token_id)([domain[0][0]]), seed=0)
    completion = sampled["labels"][0][sampled["labels"][0] != -100].tolist()
    assert completion == [end_of_turn]


def test_sampling_runs_once_and_is_billed_its_measured_flops(tmp_path, domain, tokenizer, monkeypatch):
    """The meter counts the sampling as it runs (no second generate to count it), and what it counts
    is a prefill with the output layer on the last position plus one decoding forward per further
    token: distill.flops.sampling_flops, the formula a vLLM sampler is billed with."""
    trainer = make_trainer(tmp_path, domain, tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)  # the callbacks' train begin
    trainer.cost.on_train_begin(trainer.args, trainer.state, trainer.control)
    calls, generate = [], trainer.model.generate
    monkeypatch.setattr(trainer.model, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    size, computed = model_size(STUDENT), 0.0
    for seed in range(3):
        batch = Collator(tokenizer.pad_token_id)([domain[0][i] for i in range(seed, seed + 2)])
        prompts = prompts_of(batch)
        sampled = trainer._sample(batch, seed=seed)
        # generate runs every row of the left-padded batch as wide as the widest prompt, as long as the longest sample
        steps = int(sampled["labels"].ne(-100).sum(1).max())
        computed += len(prompts) * sampling_flops(size, max(map(len, prompts)), steps)
    assert len(calls) == 3
    assert trainer.cost.meter.flops["generation"] == pytest.approx(computed, rel=1e-9)
