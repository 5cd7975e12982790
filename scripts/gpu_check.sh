#!/usr/bin/env bash
# The whole GPU check in one command, from anywhere in the repo:  bash scripts/gpu_check.sh [section ...]
# Correctness (tests/test_gpu.py), then throughput on a Llama-3.1-8B-shaped model with dummy weights (and the
# 70B shape at --tp-size 2 when 2 GPUs are present). Results: $OUT (default ./gpu_check_out)/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast stays off: on shared hosts it can take the GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export GIT_COMMIT="${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
python3 scripts/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
