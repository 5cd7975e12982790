#!/usr/bin/env bash
# The open issues' GPU acceptance runs, in one call of a lent GPU (docs/benchmarks.md records what each gave):
#   source .whl/setup.sh && LIMIT=585 bash scripts/gpu_open_checks.sh OUT_DIR [section ...]
# Sections, run in the order given (default: det hicache spec tests), each stopped where the call's LIMIT seconds
# (counted from the start) would be passed, a section that would get under 20 s skipped; logs go to OUT_DIR:
#   det      deterministic inference (issue 28): batch 1 end to end, plain and --enable-deterministic-inference
#            alternating $B1_ROUNDS times (default 2; the figures to compare are one run's), then `bench
#            check-determinism` on $DET_PROMPTS prompts (default 24; the acceptance's: 400) at batch sizes
#            $DET_BATCHES (default "8 24"; the acceptance's: "8 64 256"), with $DET_FLAGS (e.g. --compare)
#   hicache  the host tier on one GPU (issue 27): scripts/bench_hicache.sh gpu overflow fits ($FITS_ROUNDS, default 3)
#   spec     speculation through the Engine (issue 26): scripts/spec_gpu_check.py --sections engine
#   tests    the GPU tests of speculation's verify graphs, the step launch and the host tier (pytest -m gpu)
#   fp8      FP8 weights (issue 24): scripts/quant_gpu_check.py graph-bf16 graph-fp8 e2e-bf16 e2e-fp8
#   det500   the 500-prompt workload (issue 28's cost), plain then deterministic
#   fp8-500  the 500-prompt workload with FP8 weights, then FP8 weights and FP8 KV (issue 24: beside det500's plain)
#   moe      Qwen3-30B-A3B shape (issue 25): `bench one-batch` at batch 1 and 64 x 1k context against their floors
#   moe500   the 500-prompt workload on the Qwen3-30B-A3B shape (issue 25: beside det500's plain figure)
# Model: the Llama-3.1-8B shape (moe sections: Qwen3-30B-A3B), dummy bf16 weights. The JSON's commit is
# $GIT_COMMIT if set (the GPU machine's tree has no .git), else the checkout's.
# Compile caches: a fresh machine spends minutes building Triton's kernels and FlashInfer's JIT modules that the
# .whl cache lacks (2026-12-08, H100: a server's process start ~35 s, plain decode graphs 42-50 s, deterministic mode's
# warm-up 148 s). Each call saves what it built into OUT_DIR/compile-cache.tgz (where under 10 MiB: the carried tree
# holds 64 MiB, .whl 53); copied into .gpu-cache/ here (git ignores it) and carried (`carry: [".whl", ".gpu-cache"]`),
# the next call starts from it. At the end the logs and results are bundled into OUT_DIR/results.tgz (the device
# tool returns at most 8 files, 2 folders down).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [det|hicache|spec|tests|fp8|det500|fp8-500|moe|moe500 ...]" >&2; exit 2; }
out=$(realpath -m "$1")
shift
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(det hicache spec tests)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 GIT_COMMIT="${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
mkdir -p "$out"
start=$(date +%s)
limit=${LIMIT:-585}
caches=(.triton/cache .cache/flashinfer)  # under $HOME: Triton's kernels, FlashInfer's JIT modules
stamp=$(mktemp)
for t in .gpu-cache/*.tgz; do [ -f "$t" ] && tar xzf "$t" -C ~; done
finish() {  # the logs and results in one file; what this call compiled, for the next one
    tar czf "$out.results.tgz" -C "$out" . && rm -rf "${out:?}"/* && mv "$out.results.tgz" "$out/results.tgz"
    (cd ~ && find "${caches[@]}" -newer "$stamp" -type f 2>/dev/null | tar czf "$out/compile-cache.tgz" -T -)
    local size; size=$(stat -c %s "$out/compile-cache.tgz")
    if [ "$size" -gt $((10 << 20)) ]; then echo "compile cache: $size bytes, too large to carry"; rm "$out/compile-cache.tgz"; fi
}
trap finish EXIT
model=(--model-path radixserve/model_configs/llama-3.1-8b --load-format dummy --skip-tokenizer-init)
moe=(--model-path radixserve/model_configs/qwen3-30b-a3b --load-format dummy --skip-tokenizer-init)
workload500=(--dataset random --num-prompts 500 --random-input-len 4096 --random-output-len 2048
             --random-range-ratio 0 --no-plot --output-dir "$out")
b1=(python3 -m radixserve.bench offline --dataset random --num-prompts 1 --random-input-len 256
    --random-output-len 1024 --random-range-ratio 1 --cuda-graph-max-bs 2 "${model[@]}")

step() {  # NAME CAP_S COMMAND...: the command, stopped after CAP_S or at the call's limit; its log's tail
    local name=$1 cap=$2 t
    shift 2
    t=$((start + limit - $(date +%s) - 10))
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 20 ]; then echo "== $name: skipped (the call's limit)"; return; fi
    echo "== $name ($(date -u +%T), at most ${t}s): $*"
    timeout -k 5 "$t" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? ($(date -u +%T))"
    tail -n 40 "$out/$name.log"
}

echo "== $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)," \
     "commit $GIT_COMMIT, sections ${sections[*]}"
for section in "${sections[@]}"; do
    case $section in
    det)
        for round in $(seq "${B1_ROUNDS:-2}"); do
            step "b1-plain-$round" 200 "${b1[@]}"
            step "b1-deterministic-$round" 240 "${b1[@]}" --enable-deterministic-inference
        done
        # shellcheck disable=SC2086  # DET_BATCHES and DET_FLAGS are lists of words
        step check-determinism 580 python3 -m radixserve bench check-determinism "${model[@]}" \
            --num-prompts "${DET_PROMPTS:-24}" --batch-sizes ${DET_BATCHES:-8 24} ${DET_FLAGS:-} ;;
    hicache) FITS_ROUNDS=${FITS_ROUNDS:-3} step hicache 420 bash scripts/bench_hicache.sh "$out/hicache" gpu overflow fits ;;
    spec) step spec-engine 400 python3 scripts/spec_gpu_check.py "$out/spec" --sections engine ;;
    tests) step gpu-tests 420 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_spec.py \
               tests/test_gpu_launch.py tests/test_host_tier.py ;;
    fp8) step fp8 500 python3 scripts/quant_gpu_check.py "$out/fp8" --sections graph-bf16 graph-fp8 e2e-bf16 e2e-fp8 ;;
    det500)
        for flag in "" --enable-deterministic-inference; do
            name=500-prompts${flag:+-deterministic}
            step "$name" 580 python3 -m radixserve.bench serve --launch-server "${workload500[@]}" "${model[@]}" \
                --output-name "$name" ${flag:+"$flag"}
        done ;;
    fp8-500)
        for kv in auto fp8_e4m3; do
            name=500-prompts-fp8-kv-$kv
            step "$name" 400 python3 -m radixserve.bench serve --launch-server "${workload500[@]}" "${model[@]}" \
                --output-name "$name" --quantization fp8 --kv-cache-dtype $kv
        done ;;
    moe) step moe-one-batch 300 python3 -m radixserve bench one-batch "${moe[@]}" --batch-size 1 64 --input-len 1024 \
             --output-len 32 --runs 1 --mem-fraction-static 0.9 ;;
    moe500) step 500-prompts-moe 580 python3 -m radixserve.bench serve --launch-server "${workload500[@]}" "${moe[@]}" \
                --output-name 500-prompts-moe ;;
    *) echo "unknown section: $section" >&2; exit 2 ;;
    esac
done
