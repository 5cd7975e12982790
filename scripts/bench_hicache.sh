#!/usr/bin/env bash
# Issue 27's acceptance for the host tier (--enable-hierarchical-cache), each section the same launched-server
# bench twice in one run, with the tier and without it (`--baseline no-hicache`):
#   bash scripts/bench_hicache.sh OUT_DIR [cpu|gpu] [overflow] [fits]      (default: cpu overflow fits)
# overflow: multi-turn conversations whose working set is >= 4x the device KV pool (capped with --max-total-tokens),
#           turns of all conversations interleaved, so without the tier each turn's history was evicted before it
#           comes back; prints the TTFT p50 of turn 3 and later, tier vs none (target: >= 2.5x lower).
# fits:     a multi-turn workload that the device pool holds whole: throughput with the tier vs without (target:
#           within 3%).
# cpu: the default model (SmolLM2-135M-Instruct). gpu: the Llama-3.1-8B shape, dummy bf16 weights, one GPU.
# JSON and logs go to OUT_DIR; the JSON's commit is $GIT_COMMIT if set, else the checkout's.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [cpu|gpu] [overflow] [fits]" >&2; exit 2; }
out=$(realpath -m "$1")
shift
target=cpu
if [ $# -gt 0 ] && { [ "$1" = cpu ] || [ "$1" = gpu ]; }; then target=$1; shift; fi
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(overflow fits)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
mkdir -p "$out"
if [ "$target" = gpu ]; then
    model=(--model-path radixserve/model_configs/llama-3.1-8b --load-format dummy --skip-tokenizer-init
           --cuda-graph-max-bs 16)
    # 64 conversations x 5 turns of 256 new + 32 out tokens: 92k tokens at the end, 5.6x a 16384-token pool (which
    # holds the 8 requests in flight, 1440 tokens at most each); the host pool, 8x, holds them all (16 GiB).
    overflow=(--mt-num-conversations 64 --mt-turns 5 --mt-question-len 256 --mt-output-len 32 --max-concurrency 8
              --max-total-tokens 16384 --hicache-ratio 8)
    fits=(--mt-num-conversations 16 --mt-turns 5 --mt-question-len 256 --mt-output-len 32 --max-concurrency 8
          --max-total-tokens 65536 --hicache-size 8)
else
    model=()
    # 12 conversations x 5 turns of 256 new + 16 out tokens: 16k tokens at the end, 5.3x a 3072-token pool.
    overflow=(--mt-num-conversations 12 --mt-turns 5 --mt-question-len 256 --mt-output-len 16 --max-concurrency 4
              --max-total-tokens 3072 --hicache-ratio 8)
    fits=(--mt-num-conversations 8 --mt-turns 4 --mt-question-len 256 --mt-output-len 16 --max-concurrency 4
          --max-total-tokens 20000 --hicache-ratio 2)
fi

run() {  # run NAME ARGS...: the tier against no tier, in $out/NAME.log and $out/NAME.json
    local name=$1
    shift
    local cmd=(python3 -m radixserve.bench serve --launch-server --dataset multi-turn --enable-hierarchical-cache
               --label hicache --baseline no-hicache --no-plot --output-dir "$out" --output-name "$name"
               "$@" "${model[@]}")
    echo "== $name ($(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ)): ${cmd[*]}" \
        | tee "$out/$name.log"
    "${cmd[@]}" 2>&1 | tee -a "$out/$name.log"
}

for section in "${sections[@]}"; do
    case $section in
    overflow) run "hicache-overflow-$target" "${overflow[@]}" ;;
    fits) run "hicache-fits-$target" "${fits[@]}" ;;
    *) echo "unknown section: $section (overflow, fits)" >&2; exit 2 ;;
    esac
done
