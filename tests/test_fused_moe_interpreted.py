"""worker_proc.fused_moe's alignment and Triton grouped GEMMs through Triton's interpreter on CPU tensors, against
worker_proc.moe.grouped_experts (the CPU path): decode and prefill block sizes, an expert with no tokens, pairs
of another rank's experts (expert parallelism), float32 and float16 (the interpreter's tl.dot misreads bfloat16)."""

from __future__ import annotations

import pytest
import torch
from test_fused_interpreted import run_interpreted

pytest.importorskip("triton")


def check_align() -> None:
    """Every pair of a local expert appears once, in a block of its expert, in its original order; blocks
    past the end are -1; padding is the sentinel T * top_k; the sizes depend on T alone."""
    from worker_proc.fused_moe import align

    g = torch.Generator().manual_seed(1)
    for tokens, top_k, experts, block in ((1, 2, 4, 16), (9, 3, 6, 4), (40, 2, 8, 16)):
        ids = torch.randint(-2, experts + 2, (tokens, top_k), generator=g)  # some ids on other ranks
        ids[0, 0] = 1
        pairs, block_experts = align(ids, experts, block)
        n = tokens * top_k
        assert pairs.numel() == -(-(n + experts * (block - 1)) // block) * block
        assert block_experts.numel() == pairs.numel() // block
        flat = ids.flatten()
        mine = [p for p in range(n) if 0 <= flat[p] < experts]
        real = pairs[pairs < n].tolist()
        assert sorted(real) == mine and (pairs[pairs >= n] == n).all()
        for b, e in enumerate(block_experts.tolist()):
            chunk = [p for p in pairs[b * block:(b + 1) * block].tolist() if p < n]
            if e < 0:
                assert not chunk
            else:
                assert chunk and all(int(flat[p]) == e for p in chunk) and chunk == sorted(chunk)
    print("align ok")


def check_fused_moe() -> None:
    from worker_proc.fused_moe import fused_experts
    from worker_proc.layers import SiluAndMul
    from worker_proc.moe import Routing, grouped_experts, route

    g = torch.Generator().manual_seed(0)
    hidden, inter, experts = 40, 24, 6
    for tokens, top_k, offset, dtype in ((0, 2, 0, torch.float32), (1, 2, 0, torch.float32), (5, 3, 2, torch.float32),
                                         (70, 2, 0, torch.float32), (13, 2, 1, torch.float16)):
        x = torch.randn(tokens, hidden, generator=g).to(dtype)
        w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
        w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
        logits = torch.randn(tokens, experts + offset, generator=g)
        logits[:, 3] -= 100  # expert 3 gets no tokens
        weights, ids = route(logits, Routing(experts + offset, top_k, renormalize=True, round_weights=False))
        local = ids - offset  # offset > 0: ids below `offset` belong to another rank
        got = fused_experts(x, w13, w2, weights, local)
        want = grouped_experts(x.float(), w13.float(), w2.float(), weights, local, SiluAndMul())
        assert got.shape == x.shape and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
        assert tokens == 0 or want.abs().max() > 0.1  # not trivially zero
    print("fused_moe ok")


def test_align_groups_pairs_by_expert():
    run_interpreted("check_align", "test_fused_moe_interpreted")


def test_fused_moe_equals_grouped_reference():
    run_interpreted("check_fused_moe", "test_fused_moe_interpreted")
