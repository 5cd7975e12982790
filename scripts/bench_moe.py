"""Times one MoE layer's experts on CUDA at a model's shape, bf16, each replayed in a CUDA graph (as decode runs):
worker_proc.moe_pairs's per-pair kernels against worker_proc.fused_moe's aligned grouped GEMMs at several token
counts, marking which one fused_experts picks (moe_pairs.serves), beside the grouped torch path (eager, for
reference); prints microseconds, the bandwidth of the expert weights the tokens touch (what decode is bound by) and
each path's relative error against the grouped path; then the aligned path's alignment alone, one Triton program
against the torch operators (fused_moe.ALIGN_KERNEL_PAIRS picks between them), and the router's kernel against
torch's operators. With --sweep, times moe_pairs's block shapes at 1 and 8 tokens.

    python scripts/bench_moe.py [model_configs name, default qwen3-30b-a3b] [--sweep]
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from worker_proc import moe_pairs, moe_router  # noqa: E402
from worker_proc.fused_moe import (  # noqa: E402
    ALIGN_KERNEL_PAIRS,
    align_one_program,
    align_torch,
    aligned_experts,
    block_m_for,
    padded_length,
)
from worker_proc.layers import SiluAndMul  # noqa: E402
from worker_proc.moe import Routing, grouped_experts, route  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 64, 256, 1024)
SWEEP = (moe_pairs.Blocks(), moe_pairs.Blocks(4, 1024, 8, 128), moe_pairs.Blocks(16, 256, 4, 256),
         moe_pairs.Blocks(8, 512, 16, 64), moe_pairs.Blocks(4, 512, 4, 256), moe_pairs.Blocks(8, 1024, 8, 256))


def eager_us(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def graph_us(calls: list) -> float:
    """Microseconds per call of the callables `calls` captured one after another in one CUDA graph (launch gaps
    as in decode; each routes its own tokens, so the experts they read change from call to call as from layer to
    layer, rather than staying in L2)."""
    for fn in calls:  # compile outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return eager_us(graph.replay) / len(calls)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    name = args[0] if args else "qwen3-30b-a3b"
    c = json.loads((ROOT / "radixserve" / "model_configs" / name / "config.json").read_text())
    experts = c.get("num_experts") or c["num_local_experts"]
    top_k, hidden = c["num_experts_per_tok"], c["hidden_size"]
    inter = c.get("moe_intermediate_size") or c["intermediate_size"]
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda").bfloat16() / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda").bfloat16() / inter**0.5
    expert_bytes = 3 * hidden * inter * 2
    print(f"{name}: {experts} experts, top {top_k}, hidden {hidden}, intermediate {inter}, "
          f"{torch.cuda.get_device_name()}")

    def cases(tokens: int, n: int = 20) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """n batches of `tokens`: (x, routing weights, expert ids), each routed at random."""
        g = torch.Generator(device="cuda").manual_seed(tokens)
        out = []
        for _ in range(n):
            x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
            logits = torch.randn(tokens, experts, device="cuda", generator=g)
            out.append((x, *route(logits, Routing(experts, top_k, True, False))))
        return out

    def pairs(batches, blocks=moe_pairs.Blocks()):
        return [functools.partial(moe_pairs.pair_experts, x, w13, w2, w, ids, blocks) for x, w, ids in batches]

    def aligned(batches):
        return [functools.partial(aligned_experts, x, w13, w2, w, ids) for x, w, ids in batches]

    if "--sweep" in sys.argv:
        print(f"{'blocks (gate_up n, k, down n, k)':>34} {'tokens':>7} {'per-pair us':>11} {'GB/s':>7}")
        for tokens in (1, 8):
            batches = cases(tokens)
            hit = sum(ids.unique().numel() for _, _, ids in batches) / len(batches)
            for blocks in SWEEP:
                us = graph_us(pairs(batches, blocks))
                print(f"{str(tuple(blocks)):>34} {tokens:>7} {us:>11.1f} {hit * expert_bytes / us / 1e3:>7.0f}")
        return

    print(f"{'tokens':>7} {'hit':>4} {'per-pair us':>11} {'GB/s':>6} {'aligned us':>10} {'GB/s':>6} {'picks':>8} "
          f"{'grouped us':>10} {'pair err':>8} {'align err':>9}")
    for tokens in TOKENS:
        batches = cases(tokens)
        hit = sum(ids.unique().numel() for _, _, ids in batches) / len(batches)
        x, weights, ids = batches[0]
        want = grouped_experts(x, w13, w2, weights, ids, SiluAndMul())
        pair_us, aligned_us = graph_us(pairs(batches)), graph_us(aligned(batches))
        grouped_us = eager_us(lambda: grouped_experts(x, w13, w2, weights, ids, SiluAndMul()))  # noqa: B023
        picks = "per-pair" if moe_pairs.serves(tokens, top_k, experts) else "aligned"
        pair_err = rel_err(moe_pairs.pair_experts(x, w13, w2, weights, ids), want)
        align_err = rel_err(aligned_experts(x, w13, w2, weights, ids), want)
        gb = hit * expert_bytes / 1e3  # bytes / us / 1e3 = GB/s
        print(f"{tokens:>7} {hit:>4.0f} {pair_us:>11.1f} {gb / pair_us:>6.0f} {aligned_us:>10.1f} "
              f"{gb / aligned_us:>6.0f} {picks:>8} {grouped_us:>10.1f} {pair_err:>8.1e} {align_err:>9.1e}")

    print(f"\n{'tokens':>7} {'pairs':>6} {'align: one program us':>21} {'torch us':>8} {'picks':>11}")
    for tokens in (8, 16, 64, 128, 256, 512):
        flats, block_m = [ids.flatten() for _, _, ids in cases(tokens)], block_m_for(tokens)
        n = tokens * top_k
        padded = padded_length(n, experts, block_m)
        one_us = graph_us([functools.partial(align_one_program, f, experts, block_m, padded) for f in flats])
        torch_us = graph_us([functools.partial(align_torch, f, experts, block_m, padded) for f in flats])
        picks = "one program" if n <= ALIGN_KERNEL_PAIRS else "torch"
        print(f"{tokens:>7} {n:>6} {one_us:>21.1f} {torch_us:>8.1f} {picks:>11}")

    routing = Routing(experts, top_k, True, c.get("model_type") != "mixtral")
    print(f"\n{'tokens':>7} {'router: kernel us':>17} {'torch us':>8}")
    for tokens in (1, 64):
        logits = [torch.randn(tokens, experts, device="cuda").bfloat16() for _ in range(20)]
        kernel_us = graph_us([functools.partial(moe_router.route, lg, top_k, routing.renormalize,
                                                routing.round_weights) for lg in logits])
        torch_us = graph_us([functools.partial(route, lg, routing) for lg in logits])
        print(f"{tokens:>7} {kernel_us:>17.1f} {torch_us:>8.1f}")


if __name__ == "__main__":
    main()
