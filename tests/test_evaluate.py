"""Specifications of `distill eval`: its numbers are the ones a direct computation gives, its figures
are PNG files, and it shows sequence-level distillation working."""

import json

import matplotlib.image
import pytest
import torch
from PIL import Image

from distill import finetune, generate
from distill.cli import main
from distill.data import load_rows
from distill.flops import forward_flops, model_size
from distill.models import load_model, load_tokenizer

from conftest import DATA, ROOT, STUDENT, TEACHER

HELD_OUT = str(DATA / "domain_eval.jsonl")
ROWS = 10
MAX_LENGTH = 64
PRICE, PEAK, MFU = 2.5, 989.0, 0.4


def run_eval(out, student=STUDENT, *extra, data=HELD_OUT, rows=ROWS):
    args = ["eval", "--teacher", TEACHER, "--student", student, "--data", data, "--max_samples", str(rows),
            "--max_length", str(MAX_LENGTH), "--batch_size", "4", "--num_prompts", "2", "--max_new_tokens", "6",
            "--output_dir", str(out), *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads((out / "eval_report.json").read_text())


def fake_run_dir(path):
    """A training output dir as the Trainer leaves it: log history in a checkpoint's trainer_state.json."""
    history = [{"step": s, "loss": 5 / s, "kd_loss": 4 / s, "ce_loss": 6 / s} for s in (10, 20, 30)]
    history += [{"step": s, "eval_loss": 5.5 / s, "eval_agreement": 0.1 * s / 10} for s in (10, 30)]
    (path / "checkpoint-30").mkdir(parents=True)
    (path / "checkpoint-30" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    run_dir = fake_run_dir(tmp / "run")
    out = tmp / "report"
    r = run_eval(out, STUDENT, "--run_dir", str(run_dir), "--gpu_hour_price", str(PRICE),
                 "--peak_tflops", str(PEAK), "--mfu", str(MFU))  # fmt: skip
    return r, out


@pytest.fixture(scope="module")
def reference():
    """Direct computation, one unpadded row at a time in float64: per-model NLL of the completion
    tokens (and the EOS that ends them), KL(teacher || student) over the shared ids, argmax matches."""
    tok = load_tokenizer(STUDENT)
    models = {"teacher": load_model(TEACHER), "student": load_model(STUDENT)}
    sums = {"nll_teacher": 0.0, "nll_student": 0.0, "kl": 0.0, "matches": 0, "targets": 0}
    for row in load_rows(HELD_OUT).select(range(ROWS)):
        prompt = tok(row["prompt"])["input_ids"]
        completion = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        targets = ids[0, len(prompt) :]
        predicting = slice(len(prompt) - 1, ids.shape[1] - 1)  # position i predicts token i + 1
        with torch.no_grad():
            logp = {k: m(ids).logits[0, predicting].double().log_softmax(-1) for k, m in models.items()}
        for k in models:
            sums[f"nll_{k}"] -= logp[k].gather(1, targets[:, None]).sum().item()
        v = min(x.shape[-1] for x in logp.values())
        t = logp["teacher"][:, :v].log_softmax(-1)
        s = logp["student"][:, :v].log_softmax(-1)
        sums["kl"] += (t.exp() * (t - s)).sum().item()
        sums["matches"] += (t.argmax(-1) == s.argmax(-1)).sum().item()
        sums["targets"] += len(targets)
    return sums, models


def test_perplexity_is_exp_of_the_mean_cross_entropy_computed_directly(report, reference):
    r, _ = report
    sums, _ = reference
    assert r["data"]["target_tokens"] == sums["targets"]
    for role in ("teacher", "student"):
        mean_ce = sums[f"nll_{role}"] / sums["targets"]
        assert r[role]["mean_cross_entropy"] == pytest.approx(mean_ce, rel=1e-5)
        assert r[role]["perplexity"] == pytest.approx(torch.tensor(mean_ce).exp().item(), rel=1e-5)
    assert r["teacher"]["perplexity"] < r["student"]["perplexity"]  # a trained teacher, an untrained student


def test_agreement_and_kl_are_the_direct_computations(report, reference):
    r, _ = report
    sums, _ = reference
    assert r["student"]["top1_agreement"] == sums["matches"] / sums["targets"]
    assert r["student"]["kl_teacher_student"] == pytest.approx(sums["kl"] / sums["targets"], rel=1e-5)


def test_parameters_flops_and_dollars_per_token(report, reference):
    """Parameters as counted on the models; FLOPs per token equal the analytic 2N + 4Lsd at the eval
    context (the cost meter measures attention too); $ = FLOPs / (peak x MFU) in hours x price."""
    r, _ = report
    _, models = reference
    for role, path in (("teacher", TEACHER), ("student", STUDENT)):
        m = r[role]
        assert m["parameters"] == sum(p.numel() for p in models[role].parameters())
        assert m["flops_per_token"] == pytest.approx(forward_flops(model_size(path), 1, MAX_LENGTH), rel=1e-6)
        hours = 1e6 * m["flops_per_token"] / (PEAK * 1e12 * MFU) / 3600
        assert m["usd_per_million_tokens"] == pytest.approx(hours * PRICE, rel=1e-9)
        assert m["tokens_per_second"] > 0
    assert r["student_over_teacher"]["flops_per_token"] < 1


def test_generations_are_greedy_continuations_of_the_datas_prompts(report, reference):
    r, _ = report
    _, models = reference
    tok = load_tokenizer(STUDENT)
    prompts = load_rows(HELD_OUT).select(range(2))["prompt"]
    assert [g["prompt"] for g in r["generations"]] == prompts
    for g in r["generations"]:
        for role in ("teacher", "student"):
            enc = tok(g["prompt"], return_tensors="pt")
            new = models[role].generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            new = new[0, enc["input_ids"].shape[1] :].tolist()
            new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
            assert g[role] == tok.decode(new, skip_special_tokens=True)


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # something is drawn


def test_report_files_and_plots_are_valid(report):
    r, out = report
    assert r["files"]["loss_curves"] == "loss_curves.png"
    for name in ("loss_curves.png", "quality_vs_cost.png"):
        assert_png(out / name)
    md = (out / "eval_report.md").read_text()
    assert "![loss curves](loss_curves.png)" in md and "![quality vs cost](quality_vs_cost.png)" in md
    assert f"{r['student']['perplexity']:.4g}" in md and f"{r['student']['top1_agreement']:.3f}" in md
    assert r["training"]["steps"] == 30 and r["training"]["final"]["eval_agreement"] == pytest.approx(0.3)


def test_an_adapter_folder_is_evaluated_as_its_merged_model(tmp_path, report):
    """A LoRA adapter (what `distill finetune` saves with use_peft) is loaded onto its base and merged;
    its numbers equal those of the merged model saved as a plain one."""
    from peft import LoraConfig, get_peft_model

    adapter = get_peft_model(load_model(STUDENT), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    adapter.merge_and_unload().save_pretrained(tmp_path / "merged")
    load_tokenizer(STUDENT).save_pretrained(tmp_path / "merged")
    small = ("--num_prompts", "0")
    a = run_eval(tmp_path / "a", str(tmp_path / "adapter"), *small)["student"]
    m = run_eval(tmp_path / "m", str(tmp_path / "merged"), *small)["student"]
    assert a["perplexity"] == pytest.approx(m["perplexity"], rel=1e-5)
    assert a["top1_agreement"] == m["top1_agreement"] and a["parameters"] == m["parameters"]
    assert a["perplexity"] != pytest.approx(report[0]["student"]["perplexity"])  # the adapter did change the model


def test_bad_run_dir_fails_before_any_model_is_loaded(tmp_path, capsys):
    code = main(["eval", "--teacher", TEACHER, "--student", STUDENT, "--data", HELD_OUT, "--run_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("distill eval: error: --run_dir") and "Traceback" not in err


def test_sequence_level_kd_raises_the_students_agreement_with_the_teacher(tmp_path, monkeypatch):
    """The tiny chain: the teacher's greedy continuations (recipes/tiny_cpu_generate.yaml) fine-tune
    the student (recipes/tiny_cpu_seqkd.yaml, shortened); on held-out text the student then agrees with
    the teacher more often, and is closer to it in KL, than before."""
    monkeypatch.chdir(ROOT)
    held_out = {"data": str(DATA / "corpus_eval.jsonl"), "rows": 16}
    before = run_eval(tmp_path / "before", STUDENT, **held_out)["student"]
    data, student = tmp_path / "generated.jsonl", tmp_path / "student"
    generate.run("recipes/tiny_cpu_generate.yaml", ["--output_file", str(data), "--max_new_tokens", "16"])  # all 350
    shorter = ["--max_steps", "60", "--eval_steps", "30", "--save_steps", "60", "--disable_tqdm", "true"]
    finetune.run("recipes/tiny_cpu_seqkd.yaml", ["--dataset", str(data), "--output_dir", str(student), *shorter])
    after = run_eval(tmp_path / "after", str(student), "--run_dir", str(student), "--compare",
                     str(tmp_path / "before"), **held_out)  # fmt: skip
    assert after["student"]["top1_agreement"] > before["top1_agreement"] + 0.1
    assert after["student"]["kl_teacher_student"] < before["kl_teacher_student"]
    assert_png(tmp_path / "after" / "loss_curves.png")
