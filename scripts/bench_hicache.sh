#!/usr/bin/env bash
# Issue 27's acceptance for the host tier (--enable-hierarchical-cache): multi-turn conversations, the same bench
# with the tier and without it (`--baseline no-hicache`):
#   bash scripts/bench_hicache.sh OUT_DIR [cpu|gpu] [overflow] [fits]      (default: cpu overflow fits)
# overflow: a working set >= 4x the device KV pool (capped with --max-total-tokens; the pool still holds the
#           requests in flight), the turns of all conversations interleaved, so without the tier each turn's history
#           was evicted before it comes back; one server each, launched in turn; prints the TTFT p50 of turn 3 and
#           later, tier vs none (target: >= 2.5x lower).
# fits:     a workload that the device pool holds whole: both servers up at once and the bench run against each in
#           turn, the order alternating, $FITS_ROUNDS times (default 6), so a loaded machine's drift hits both alike;
#           prints each round's throughput ratio, the CPU time of each server's processes per output token, and their
#           medians (target: throughput within 3%; scripts/bench_rounds.py).
# cpu: the default model (SmolLM2-135M-Instruct). gpu: the Llama-3.1-8B shape, dummy bf16 weights, one GPU.
# The tier's --hicache-write-policy is $HICACHE_WRITE_POLICY (default write_through, the flag's default); the output
# names carry it. JSON and logs go to OUT_DIR; the JSON's commit is $GIT_COMMIT if set, else the checkout's.
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
    overflow=(--mt-num-conversations 64 --mt-turns 5 --mt-question-len 256 --mt-output-len 32 --max-concurrency 8)
    overflow_server=(--max-total-tokens 16384 --hicache-ratio 8)
    fits=(--mt-num-conversations 16 --mt-turns 5 --mt-question-len 256 --mt-output-len 32 --max-concurrency 8)
    fits_server=(--max-total-tokens 65536 --hicache-size 8)
else
    model=()
    # 10 conversations x 5 turns of 256 new + 16 out tokens: 13.6k tokens at the end, 4.9x a 2800-token pool (which
    # holds the 2 requests in flight, 1360 tokens at most each); the host pool, 8x, holds them all.
    overflow=(--mt-num-conversations 10 --mt-turns 5 --mt-question-len 256 --mt-output-len 16 --max-concurrency 2)
    overflow_server=(--max-total-tokens 2800 --hicache-ratio 8)
    fits=(--mt-num-conversations 8 --mt-turns 4 --mt-question-len 256 --mt-output-len 16 --max-concurrency 4)
    fits_server=(--max-total-tokens 20000 --hicache-ratio 2)
fi
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs)
policy=${HICACHE_WRITE_POLICY:-write_through}
tier=(--enable-hierarchical-cache --hicache-write-policy "$policy")
bench=(python3 -m radixserve.bench serve --dataset multi-turn --label hicache --baseline no-hicache --no-plot
       --output-dir "$out")

overflow() {  # the two servers launched in turn by the bench
    local name="hicache-overflow-$target-$policy"
    local cmd=("${bench[@]}" --launch-server "${tier[@]}" --output-name "$name" "${overflow[@]}"
               "${overflow_server[@]}" "${model[@]}")
    echo "== $name ($cpu, $(date -u +%FT%TZ)): ${cmd[*]}" | tee "$out/$name.log"
    "${cmd[@]}" 2>&1 | tee -a "$out/$name.log"
}

fits() {  # both servers up at once, the bench against each in turn (alternating), $FITS_ROUNDS rounds
    local name="hicache-fits-$target-$policy"
    echo "== $name ($cpu, $(date -u +%FT%TZ), commit ${GIT_COMMIT:-$(git rev-parse --short HEAD)}):" \
        "servers ${fits_server[*]} ${model[*]}, tier ${tier[*]}, bench ${fits[*]}" | tee "$out/$name.log"
    python3 scripts/bench_rounds.py --out "$out" --name "$name" --rounds "${FITS_ROUNDS:-6}" \
        --common-flags="${fits_server[*]} ${model[*]}" --server no-hicache="" --server hicache="${tier[*]}" \
        --bench-flags="--dataset multi-turn ${fits[*]} ${model[*]}" 2>&1 | tee -a "$out/$name.log"
}

for section in "${sections[@]}"; do
    case $section in
    overflow|fits) "$section" ;;
    *) echo "unknown section: $section (overflow, fits)" >&2; exit 2 ;;
    esac
done
