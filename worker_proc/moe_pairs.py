"""The experts of a decode-sized MoE batch on CUDA in Triton, one (token, expert) pair at a time: the maths of
worker_proc.moe.grouped_experts in two kernels, no sorting, no padding.

1. `gate_up_act`: one program per (pair p = t * top_k + k, block of BLOCK_N intermediate columns) reads the rows
   of its expert e = ids[t, k] that give gate and up, takes both dot products with x[t] on CUDA cores, and writes
   SiLU(gate) * up (rounded as worker_proc.fused.silu_and_mul rounds) to act[p]. A pair of an expert another rank
   holds (e outside [0, E_local)) returns at once and leaves act[p] unwritten.
2. `down_sum`: one program per (token t, block of BLOCK_N hidden columns) takes, for its top_k pairs side by
   side, act[t * top_k + k] @ W2[e]^T, rounds each to the activations' dtype (the grouped path's expert output),
   and sums them times their routing weights in float32 in registers; pairs of other ranks' experts are masked
   out (their act rows are never read). One store per output element: no separate sum, no atomics, and the
   order of the sum is fixed (deterministic).
So a step reads each pair's expert rows once and launches two kernels whose sizes depend on T alone (CUDA graphs).

When to use it (`serves`): the aligned path (worker_proc.fused_moe) reads each touched expert once for all of its
pairs, while this path reads it once per pair. With T tokens routed to top_k of E experts, the pairs touch
E (1 - (1 - top_k / E)^T) distinct experts on average; while T * top_k <= E / 2 that is at least 0.8 of the
pairs (Qwen3-30B-A3B, 128 experts, top 8: T <= 8; Mixtral, 8 experts, top 2: T <= 2), so reading per pair costs
at most ~1.25x the bytes and saves the alignment's kernels and its padded, mostly empty, GEMM programs. A batch of
one token never reuses an expert, so it always takes this path. scripts/bench_moe.py times both paths to check it.
triton is imported lazily, on the first call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from worker_proc import fused


class Blocks(NamedTuple):
    """Each kernel's (BLOCK_N, BLOCK_K): rows of the expert's weight per program, and columns per step of K."""

    gate_up_n: int = 8  # 8 gate and 8 up rows, as worker_proc.gemv's one-row GEMV
    gate_up_k: int = 512
    down_n: int = 8  # times the top_k experts side by side
    down_k: int = 128


def serves(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether `pair_experts` runs a batch of `tokens` routed to `top_k` of `num_experts` (all ranks' experts):
    see the module docstring."""
    return tokens * top_k <= max(num_experts // 2, top_k)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gate_up_act(x_ptr, w_ptr, ids_ptr, act_ptr, num_local, inter, hidden, stride_x, stride_we, stride_wn,
                    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pair = tl.program_id(0).to(tl.int64)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        if (expert < 0) | (expert >= num_local):
            return
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < inter
        rk = tl.arange(0, BLOCK_K)
        gate_rows = w_ptr + expert * stride_we + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        up_rows = gate_rows + inter * stride_wn
        x_row = x_ptr + (pair // TOP_K) * stride_x + rk
        acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            mask_k = rk < hidden - k0
            x = tl.load(x_row + k0, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            mask = mask_n[:, None] & mask_k[None, :]
            acc_gate += tl.load(gate_rows + k0, mask=mask, other=0.0).to(tl.float32) * x
            acc_up += tl.load(up_rows + k0, mask=mask, other=0.0).to(tl.float32) * x
        dtype = act_ptr.dtype.element_ty
        gate = tl.sum(acc_gate, axis=1).to(dtype).to(tl.float32)  # the gate_up projection's rounding
        up = tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(act_ptr + pair * inter + rn, (act * up).to(dtype), mask=mask_n)

    @triton.jit
    def down_sum(act_ptr, w_ptr, ids_ptr, route_ptr, out_ptr, num_local, hidden, inter, stride_we, stride_wn,
                 stride_out, TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
        """Tiles [K_PAD, BLOCK_N, BLOCK_K]: the token's top_k experts' rows side by side, so each step of K
        loads all of them at once."""
        token = tl.program_id(0).to(tl.int64)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        slot = tl.arange(0, K_PAD)
        pairs = token * TOP_K + slot
        expert = tl.load(ids_ptr + pairs, mask=slot < TOP_K, other=-1).to(tl.int64)
        mine = (slot < TOP_K) & (expert >= 0) & (expert < num_local)
        width = tl.where(mine, inter, 0)[:, None, None]  # another rank's expert (or a padding slot): loads masked
        mask_n = (rn < hidden)[None, :, None]
        rows = (w_ptr + tl.where(mine, expert, 0)[:, None, None] * stride_we
                + rn.to(tl.int64)[None, :, None] * stride_wn + rk[None, None, :])
        act_rows = act_ptr + pairs[:, None, None] * inter + rk[None, None, :]
        acc = tl.zeros((K_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            mask_k = rk[None, None, :] < width - k0
            a = tl.load(act_rows + k0, mask=mask_k, other=0.0).to(tl.float32)
            acc += tl.load(rows + k0, mask=mask_k & mask_n, other=0.0).to(tl.float32) * a
        dtype = out_ptr.dtype.element_ty
        y = tl.sum(acc, axis=2).to(dtype).to(tl.float32)  # each expert's output, rounded as the grouped path's
        route_w = tl.load(route_ptr + pairs, mask=mine, other=0.0)
        total = tl.sum(y * route_w[:, None], axis=0)  # a fixed reduction tree over the top_k
        tl.store(out_ptr + token * stride_out + rn, total.to(dtype), mask=rn < hidden)

    return gate_up_act, down_sum


def pair_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                 local_ids: torch.Tensor, blocks: Blocks = Blocks()) -> torch.Tensor:
    """worker_proc.moe.grouped_experts's result for x [T, H] (unit stride along H) with this rank's stacked experts
    w13 [E_local, 2I, H], w2 [E_local, H, I], float32 routing weights [T, top_k] and ids [T, top_k] (ids outside
    [0, E_local) contribute nothing); see the module docstring."""
    gate_up_act, down_sum = _kernels()
    tokens, top_k = local_ids.shape
    num_local, hidden, inter = w2.shape
    assert x.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous() and w13.shape[1] == 2 * inter
    out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    ids, route_w = local_ids.contiguous(), weights.float().contiguous()
    act = torch.empty((tokens * top_k, inter), dtype=x.dtype, device=x.device)
    gate_up_n, gate_up_k, down_n, down_k = blocks
    gate_up_act[(tokens * top_k, -(-inter // gate_up_n))](
        x, w13, ids, act, num_local, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1),
        TOP_K=top_k, BLOCK_N=gate_up_n, BLOCK_K=gate_up_k, num_warps=4)
    down_sum[(tokens, -(-hidden // down_n))](
        act, w2, ids, route_w, out, num_local, hidden, inter, w2.stride(0), w2.stride(1), out.stride(0),
        TOP_K=top_k, K_PAD=max(2, fused.pow2(top_k)), BLOCK_N=down_n, BLOCK_K=down_k, num_warps=4)
    return out
