#!/usr/bin/env bash
# The benchmark issue's GPU targets, Llama-3.1-8B shape with dummy bf16 weights, one command per section:
#   bash scripts/bench_h200.sh [gsp] [gsp-no-cascade] [multi-turn] [offline]   (default: all; ~12 min on an H200)
# gsp:        generated-shared-prefix 64 groups x 16 prompts, 2048-token system prompt, 128-token question,
#             256 output tokens; radix cache on vs off (offline Engine, all requests at once).
# gsp-no-cascade: the same with the radix cache on and --disable-cascade-attention.
# multi-turn: 64 conversations x 5 turns (512 new tokens, 128 out per turn) against a launched server at
#             2 conversations/s; TTFT by turn, radix on vs off.
# offline:    random 1024 in / 256 out x 2000 prompts vs HF generate at batch 64, 128 and 256 (HF on the first
#             256 prompts: throughputs are rates, so they compare).
# JSON, PNG and logs go to $OUT (default ./bench_h200_out); the JSON's commit is $GIT_COMMIT if set (pass it
# where the tree is a copy whose git metadata may lag), else the checkout's.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
out="${OUT:-bench_h200_out}"
mkdir -p "$out"
model=(--model-path radixserve/model_configs/llama-3.1-8b --load-format dummy --skip-tokenizer-init
       --output-dir "$out")
gsp=(--dataset generated-shared-prefix --gsp-num-groups 64 --gsp-prompts-per-group 16 --gsp-system-prompt-len 2048
     --gsp-question-len 128 --gsp-output-len 256)
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(gsp multi-turn offline)

run() {  # run NAME ARGS...: one bench, its output in $out/NAME.log
    local name=$1
    shift
    echo "== $name: python -m radixserve.bench $*" | tee "$out/$name.log"
    python3 -m radixserve.bench "$@" --output-name "$name" "${model[@]}" 2>&1 | tee -a "$out/$name.log"
}

for section in "${sections[@]}"; do
    case $section in
    gsp)
        run gsp offline "${gsp[@]}" --baseline no-radix ;;
    gsp-no-cascade)
        run gsp-no-cascade offline "${gsp[@]}" --disable-cascade-attention --label radix-no-cascade ;;
    multi-turn)
        run multi-turn serve --launch-server --dataset multi-turn --mt-num-conversations 64 --mt-turns 5 \
            --mt-question-len 512 --mt-output-len 128 --request-rate 2 --baseline no-radix ;;
    offline)
        run offline offline --dataset random --num-prompts 2000 --random-input-len 1024 --random-output-len 256 \
            --baseline hf --hf-batch-size 64 128 256 --hf-num-prompts 256 ;;
    *)
        echo "unknown section: $section (gsp, gsp-no-cascade, multi-turn, offline)" >&2
        exit 2 ;;
    esac
done
