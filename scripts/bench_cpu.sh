#!/usr/bin/env bash
# The speed issue's CPU targets on the default model (SmolLM2-135M-Instruct, --dtype auto), one command:
#   bash scripts/bench_cpu.sh
# serve:   16 random prompts (64 in / 32 out) through a launched server, one at a time and 16 at once, for each
#          weight format side by side: the GGUF expanded to bf16, its own Q4_1 blocks, and int8 (docs/quantization.md).
# offline: 16 random prompts (128 in / 64 out) through the Engine beside HF transformers `generate` in the same run
#          (one batch of 16, the same dtype as the engine; the GGUF expanded, --quantization none, as HF runs it).
# With ROUNDS=N the serve part instead has the three servers up at once and runs the bench against each in turn,
# N rounds, the order rotating (scripts/bench_rounds.py): each round's ratios to bf16 and their medians, beside the
# servers' CPU time per output token, for a machine whose other tenants move one-shot figures by 20% or more.
# JSON, PNG and logs go to $OUT (default ./bench_cpu_out). Measure on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-bench_cpu_out}"
mkdir -p "$out"
workload=(--dataset random --num-prompts 16 --random-input-len 64 --random-output-len 32 --random-range-ratio 1
          --max-concurrency 1 16)
if [ -n "${ROUNDS:-}" ]; then
    python3 scripts/bench_rounds.py --out "$out" --name cpu-serve-rounds --rounds "$ROUNDS" \
        --server bf16="--dtype bfloat16 --quantization none" --server gguf="--quantization gguf" \
        --server int8="--quantization int8" --bench-flags="${workload[*]}" 2>&1 | tee "$out/cpu-serve-rounds.log"
else
    python3 -m radixserve.bench serve --launch-server "${workload[@]}" --weight-dtypes bf16 gguf int8 \
        --output-dir "$out" --output-name cpu-serve 2>&1 | tee "$out/cpu-serve.log"
fi
python3 -m radixserve.bench offline --quantization none --baseline hf --hf-batch-size 16 --dataset random \
    --num-prompts 16 --random-input-len 128 --random-output-len 64 --random-range-ratio 1 --output-dir "$out" \
    --output-name cpu-offline 2>&1 | tee "$out/cpu-offline.log"
