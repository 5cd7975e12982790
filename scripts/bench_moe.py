"""Times one MoE layer's experts on CUDA at a model's shape, bf16: worker_proc.fused_moe's Triton kernels against
the grouped torch path (worker_proc.moe.grouped_experts), each at several token counts; prints microseconds and
the bandwidth of the expert weights the tokens touch (what decode is bound by).

    python scripts/bench_moe.py [model_configs name, default qwen3-30b-a3b]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from worker_proc.fused_moe import fused_experts  # noqa: E402
from worker_proc.layers import SiluAndMul  # noqa: E402
from worker_proc.moe import Routing, grouped_experts, route  # noqa: E402


def time_us(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "qwen3-30b-a3b"
    c = json.loads((ROOT / "radixserve" / "model_configs" / name / "config.json").read_text())
    experts = c.get("num_experts") or c["num_local_experts"]
    top_k, hidden = c["num_experts_per_tok"], c["hidden_size"]
    inter = c.get("moe_intermediate_size") or c["intermediate_size"]
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda").bfloat16() / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda").bfloat16() / inter**0.5
    print(f"{name}: {experts} experts, top {top_k}, hidden {hidden}, intermediate {inter}, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'tokens':>7} {'experts hit':>11} {'fused us':>9} {'GB/s':>7} {'grouped us':>10} {'rel err':>8}")
    for tokens in (1, 8, 32, 64, 256, 1024, 4096):
        x = torch.randn(tokens, hidden, device="cuda").bfloat16()
        weights, ids = route(torch.randn(tokens, experts, device="cuda"), Routing(experts, top_k, True, False))
        hit = ids.unique().numel()
        fused_us = time_us(lambda: fused_experts(x, w13, w2, weights, ids))  # noqa: B023
        grouped_us = time_us(lambda: grouped_experts(x, w13, w2, weights, ids, SiluAndMul()), reps=10)  # noqa: B023
        got, want = fused_experts(x, w13, w2, weights, ids), grouped_experts(x, w13, w2, weights, ids, SiluAndMul())
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        gbps = hit * 3 * hidden * inter * 2 / (fused_us * 1e-6) / 1e9
        print(f"{tokens:>7} {hit:>11} {fused_us:>9.1f} {gbps:>7.0f} {grouped_us:>10.1f} {err:>8.1e}")


if __name__ == "__main__":
    main()
