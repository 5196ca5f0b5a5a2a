"""The CUDA paths of distill, proved on one GPU in a few minutes; run by benchmarks/gpu_check.sh.

Checks, each on its own so that one failure does not hide the others:
  tiny_bf16   `distill train recipes/tiny_cpu.yaml` on the GPU in bf16: exit 0, held-out agreement
  loss_cuda   chunked vs reference loss gradients against float64, on CUDA, in bf16 (autocast) and in
              fp16 weights with a 2^16 loss scale and a 131,072-token step: the chunked error must
              not exceed twice the reference path's
  step        benchmarks/step_overhead.py --cuda --only large: the 8x512 -> 4x256 pair in bf16,
              step-overhead ratio and MFU
  qlora       a 4-bit NF4 student through distill.adapters (bitsandbytes), one forward + backward
Prints what it finds, then one line of JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def tiny_bf16(out: Path) -> dict:
    code, log = run([sys.executable, "-m", "distill.cli", "train", "recipes/tiny_cpu.yaml", "--use_cpu", "false",
                     "--bf16", "true", "--output_dir", str(out / "tiny_bf16")], timeout=240)  # fmt: skip
    metrics = json.loads((out / "tiny_bf16" / "metrics.json").read_text()) if code == 0 else {}
    cost = json.loads((out / "tiny_bf16" / "cost_report.json").read_text()) if code == 0 else {}
    return {
        "ok": code == 0,
        "agreement": metrics.get("eval", {}).get("eval_agreement"),
        "kd_loss": metrics.get("eval", {}).get("eval_kd_loss"),
        "mfu": cost.get("mfu"),
        "tail": "" if code == 0 else log[-1500:],
    }


def loss_cuda(device: str = "cuda", tokens: int = 4096, vocab: int = 32000, hidden: int = 1024) -> dict:
    import torch

    from distill.chunked import chunked_distillation_loss
    from distill.losses import distillation_loss

    g = torch.Generator(device=device).manual_seed(0)
    h_s = torch.randn(1, tokens, hidden, device=device, dtype=torch.float64, generator=g)
    w_s = torch.randn(vocab, hidden, device=device, dtype=torch.float64, generator=g) * hidden**-0.5
    h_t = torch.randn(1, tokens, hidden, device=device, dtype=torch.float64, generator=g)
    w_t = torch.randn(vocab, hidden, device=device, dtype=torch.float64, generator=g) * hidden**-0.5
    labels = torch.randint(0, vocab, (1, tokens), device=device, generator=g)
    kw = {"alpha": 0.5, "temperature": 2.0, "num_items_in_batch": 131_072}

    def grads(fn, dtype, scale, autocast):
        hs, ws = (x.detach().to(dtype).requires_grad_() for x in (h_s, w_s))
        ht, wt = h_t.to(dtype), w_t.to(dtype)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = fn(hs, ws, ht, wt, labels, **kw)
        (out.loss * scale).backward()
        return hs.grad.double() / scale, ws.grad.double() / scale

    def reference(hs, ws, ht, wt, y, **k):
        return distillation_loss(hs @ ws.T, (ht @ wt.T).detach(), y, **k)

    want = grads(reference, torch.float64, 1.0, False)
    result = {}
    for name, dtype, scale, autocast in (
        ("bf16", torch.float32, 1.0, True),
        ("fp16_scaled", torch.float16, 2.0**16, False),
    ):
        errors = {}
        for path, fn in (("reference", reference), ("chunked", chunked_distillation_loss)):
            got = grads(fn, dtype, scale, autocast)
            errors[path] = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
        ok = all(c <= 2 * r + 1e-6 for c, r in zip(errors["chunked"], errors["reference"]))
        result[name] = {"ok": ok, "reference_err_h_w": errors["reference"], "chunked_err_h_w": errors["chunked"]}
        if device == "cuda":
            torch.cuda.empty_cache()
    result["ok"] = all(v["ok"] for v in result.values())
    return result


def step() -> dict:
    code, log = run([sys.executable, "benchmarks/step_overhead.py", "--cuda", "--only", "large", "--steps", "10"],
                    timeout=300)  # fmt: skip
    if code != 0:
        return {"ok": False, "tail": log[-1500:]}
    row = json.loads(log.strip().splitlines()[-1])["results"][0]
    return {"ok": True, "ratio": row["ratio"], "mfu": row["mfu"], "distill_step_s": row["distill_step_s"]}


def qlora(out: Path) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        return {"ok": False, "error": f"bitsandbytes is not installed here: {err}"}
    import torch

    from distill import adapters
    from distill.config import DistillConfig, ModelArguments

    model_args = ModelArguments(model_name_or_path=str(ROOT / "tiny_models/student"), use_peft=True,
                                load_in_4bit=True, dtype="bfloat16", lora_r=8)  # fmt: skip
    config = DistillConfig(output_dir=str(out / "qlora"), teacher_model_name_or_path="unused", bf16=True)
    adapters.check(model_args, config)
    model = adapters.load_student(model_args, config)
    ids = torch.randint(3, 500, (2, 32), device=model.device)
    model(input_ids=ids, labels=ids).loss.backward()
    quantized = sum("4bit" in type(m).__name__.lower() for m in model.modules())
    trained = sum(p.grad is not None for p in model.parameters() if p.requires_grad)
    return {"ok": quantized > 0 and trained > 0, "linear4bit_modules": quantized, "params_with_grad": trained}


def main() -> None:
    import torch

    report = {"benchmark": "gpu_check", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__}  # fmt: skip
    if not torch.cuda.is_available():
        report["ok"] = False
        report["error"] = "no CUDA device"
        print(json.dumps(report))
        sys.exit(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in (("tiny_bf16", lambda: tiny_bf16(Path(tmp))), ("loss_cuda", loss_cuda), ("step", step),
                            ("qlora", lambda: qlora(Path(tmp)))):  # fmt: skip
            start = time.perf_counter()
            try:
                report[name] = check()
            except Exception as err:  # a failed check is reported, and the next one still runs
                report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            report[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(f"{name}: {report[name]}", flush=True)
    report["ok"] = all(report[k]["ok"] for k in ("tiny_bf16", "loss_cuda", "step", "qlora"))
    print(json.dumps(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
