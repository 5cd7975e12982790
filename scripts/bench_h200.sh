#!/usr/bin/env bash
# The GPU targets of the benchmark and speed issues, dummy bf16 weights (Llama-3.1-8B shape unless said), one
# command per section:
#   bash scripts/bench_h200.sh [runner] [bs1] [sglang-ci] [qwen-one-batch] [gsp] [gsp-no-cascade] [multi-turn] [offline] [dp2]
#   (default: runner bs1 sglang-ci qwen-one-batch gsp multi-turn)
# runner:     scripts/gpu_check.sh runner tp2_70b (decode at batch 1 and 256 x 1k vs the floor, step by step and pipelined;
#             the 70B shape at --tp-size 2 when 2 GPUs are here).
# bs1:        end to end at batch 1: one random 256-token prompt, 1024 output tokens (offline Engine).
# sglang-ci:  SGLang's CI throughput workload: 500 random prompts (up to 4096 in / 2048 out), all at once, against
#             a launched server.
# qwen-one-batch: Qwen2.5-7B shape, one static batch of 1 and of 64 (1024 in / 64 out) beside the bandwidth floor.
# gsp:        generated-shared-prefix 64 groups x 16 prompts, 2048-token system prompt, 128-token question,
#             256 output tokens; radix cache on vs off (offline Engine, all requests at once).
# gsp-no-cascade: the same with the radix cache on and --disable-cascade-attention.
# multi-turn: 64 conversations x 5 turns (512 new tokens, 128 out per turn) against a launched server at
#             2 conversations/s; TTFT by turn, radix on vs off.
# offline:    random 1024 in / 256 out x 2000 prompts vs HF generate at batch 64, 128 and 256 (HF on the first
#             256 prompts: throughputs are rates, so they compare).
# dp2:        2 GPUs: the offline section's workload (random 1024 in / 256 out x 2000, all at once) against a
#             launched server at --dp-size 1 and at --dp-size 2 (two replicas behind SGLang's router, default
#             policy); prints dp2 / dp1 output throughput (target >= 1.8). DP2_PROMPTS overrides the 2000.
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
[ ${#sections[@]} -gt 0 ] || sections=(runner bs1 sglang-ci qwen-one-batch gsp multi-turn)

run() {  # run NAME ARGS...: one bench (the 8B shape unless ARGS name another --model-path), in $out/NAME.log
    local name=$1
    shift
    echo "== $name: python -m radixserve.bench $* ${model[*]}" | tee "$out/$name.log"
    python3 -m radixserve.bench "$@" --output-name "$name" "${model[@]}" 2>&1 | tee -a "$out/$name.log"
}

for section in "${sections[@]}"; do
    case $section in
    runner)
        OUT="$out" bash scripts/gpu_check.sh runner tp2_70b ;;
    bs1)
        run bs1 offline --dataset random --num-prompts 1 --random-input-len 256 --random-output-len 1024 \
            --random-range-ratio 1 --cuda-graph-max-bs 2 ;;
    sglang-ci)
        run sglang-ci serve --launch-server --dataset random --num-prompts 500 --random-input-len 4096 \
            --random-output-len 2048 --random-range-ratio 0 ;;
    qwen-one-batch)
        model[1]=radixserve/model_configs/qwen2.5-7b
        run qwen-one-batch one-batch --batch-size 1 64 --input-len 1024 --output-len 64
        model[1]=radixserve/model_configs/llama-3.1-8b ;;
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
    dp2)
        rnd=(--dataset random --num-prompts "${DP2_PROMPTS:-2000}" --random-input-len 1024 --random-output-len 256 --no-plot)
        run dp1 serve --launch-server "${rnd[@]}" --label dp1
        run dp2 serve --launch-server "${rnd[@]}" --dp-size 2 --label dp2
        python3 -c 'import json, sys; t = [json.load(open(f"{sys.argv[1]}/{n}.json"))["runs"][0]["metrics"]["output_throughput"] for n in ("dp1", "dp2")]; print(f"dp2 / dp1 output throughput: {t[1]:.0f} / {t[0]:.0f} tok/s = {t[1] / t[0]:.2f}x")' "$out" | tee -a "$out/dp2.log" ;;
    *)
        echo "unknown section: $section (runner, bs1, sglang-ci, qwen-one-batch, gsp, gsp-no-cascade, multi-turn, offline, dp2)" >&2
        exit 2 ;;
    esac
done
