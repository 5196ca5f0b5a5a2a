#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh
#
# Proves distill's CUDA paths on one GPU in under 8 minutes and prints one line of JSON (last line):
# the tiny recipe in bf16; the chunked loss against the reference in bf16 and in fp16 with loss
# scaling; the 8x512 -> 4x256 pair's step-overhead ratio and MFU in bf16; QLoRA loading through
# bitsandbytes. Run it from the repository root, in an environment with distill installed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHONUNBUFFERED=1 timeout 470 python benchmarks/gpu_check.py
