#!/usr/bin/env bash
# Issue 27's router acceptance on the CPU: 4 replicas of the default model behind SGLang's model gateway (smg, the
# default here) or sglang-router, generated-shared-prefix 16 groups x 4 prompts sent at once through the router's
# /v1/completions, once per policy (cache_aware, round_robin); then checks the targets: cache_aware's hit rate
# >= 65% (~73% is the most possible: a group's first prompt cannot hit), round_robin's <= 35%, and the router's
# GET /get_loads (sampled every second during each run) listing every worker's load.
#   bash scripts/bench_router.sh OUT_DIR [smg|sglang-router [FLAG...]]
# FLAGs go to the bench and the launched servers, e.g. --router-balance-abs-threshold 1000000 (the results are then
# named router-PACKAGE-flags).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [smg|sglang-router [FLAG...]]" >&2; exit 2; }
out=$(realpath -m "$1")
package=${2:-smg}
shift $(( $# < 2 ? $# : 2 ))
flags=("$@")
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
mkdir -p "$out"
name="router-$package${flags[0]:+-flags}"
cmd=(python3 -m radixserve.bench serve --launch-server --dp-size 4 --router-package "$package"
     --router-policies cache_aware round_robin --label cache_aware --backend openai --model SmolLM2-135M-Instruct
     --dataset generated-shared-prefix --gsp-num-groups 16 --gsp-prompts-per-group 4 --gsp-system-prompt-len 256
     --gsp-question-len 8 --gsp-output-len 8 --max-total-tokens 12288 --no-plot --output-dir "$out"
     --output-name "$name" "${flags[@]}")
echo "== $name ($(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ)): ${cmd[*]}" \
    | tee "$out/$name.log"
"${cmd[@]}" 2>&1 | tee -a "$out/$name.log"
python3 - "$out/$name.json" <<'EOF' | tee -a "$out/$name.log"
import json, sys

report = json.load(open(sys.argv[1]))
ok = True
for run in report["runs"]:
    hit, policy = run["metrics"]["cache_hit_rate"], run["label"]
    target = (hit >= 0.65) if policy == "cache_aware" else (hit <= 0.35)
    loads = run.get("router_loads") or {}
    workers = {w["worker"] for w in loads.get("loads", []) + loads.get("workers", [])}
    print(f"{policy}: cache hit rate {hit:.1%} ({'meets' if target else 'MISSES'} the target), "
          f"/get_loads lists {len(workers)} of 4 workers")
    ok &= target and len(workers) == 4
print("targets met" if ok else "TARGETS MISSED")
sys.exit(0 if ok else 1)
EOF
