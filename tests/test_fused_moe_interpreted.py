"""worker_proc.fused_moe's alignment and Triton grouped GEMMs, and worker_proc.moe_pairs's per-pair kernels, through
Triton's interpreter on CPU tensors, against worker_proc.moe.grouped_experts (the CPU path): decode and prefill
block sizes, an expert with no tokens, pairs of another rank's experts (expert parallelism), float32 and float16
(the interpreter's tl.dot misreads bfloat16)."""

from __future__ import annotations

import pytest
import torch
from test_fused_interpreted import run_interpreted

pytest.importorskip("triton")


def check_align() -> None:
    """Every pair of a local expert appears once, in a block of its expert, in its original order; blocks
    past the end are -1; padding is the sentinel T * top_k; the sizes depend on T alone; the one-program Triton
    alignment gives the torch one's bits (one chunk of pairs and several, 6 to 128 experts)."""
    from worker_proc.fused_moe import ALIGN_KERNEL_PAIRS, align, align_one_program, align_torch, padded_length

    g = torch.Generator().manual_seed(1)
    for tokens, top_k, experts, block in ((1, 2, 4, 16), (9, 3, 6, 4), (40, 2, 8, 16), (70, 8, 128, 16), (3, 2, 6, 4)):
        ids = torch.randint(-2, experts + 2, (tokens, top_k), generator=g)  # some ids on other ranks
        ids[0, 0] = 1
        if experts == tokens * top_k:  # every pair its own expert: the padding's worst case, every slot used
            ids = torch.randperm(experts, generator=g).view(tokens, top_k)
        pairs, block_experts = align(ids, experts, block)
        n = tokens * top_k
        assert n <= ALIGN_KERNEL_PAIRS
        assert pairs.numel() == padded_length(n, experts, block)
        by_torch = align_torch(ids.flatten(), experts, block, pairs.numel())
        by_kernel = align_one_program(ids.flatten(), experts, block, pairs.numel())
        assert all(torch.equal(a, b) for a, b in zip(by_kernel, by_torch, strict=True))
        assert torch.equal(pairs, by_kernel[0]) and torch.equal(block_experts, by_kernel[1])
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
    from worker_proc.fused_moe import aligned_experts
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
        got = aligned_experts(x, w13, w2, weights, local)
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


def check_pair_experts() -> None:
    """pair_experts == grouped_experts at T = 1, 2, 3 with top_k 2 .. 8, renormalised routing weights or not, some
    ids on another rank (below or above this rank's range), small blocks that split hidden and intermediate into
    several K steps (the last partial) and a partial N block, and the default blocks; and at moe_pairs.serves's
    threshold fused_experts (the per-pair path) equals the aligned path, and one token past it takes that path."""
    from worker_proc import moe_pairs
    from worker_proc.fused_moe import aligned_experts, fused_experts
    from worker_proc.layers import SiluAndMul
    from worker_proc.moe import Routing, grouped_experts, route

    g = torch.Generator().manual_seed(2)
    hidden, inter, experts = 44, 28, 8
    small = moe_pairs.Blocks(8, 16, 8, 16)
    cases = ((1, 2, 0, True, torch.float32), (1, 8, 4, False, torch.float32), (2, 4, 3, True, torch.float16),
             (3, 3, 0, False, torch.float32), (3, 5, 2, True, torch.float16), (2, 8, 0, True, torch.float16))
    for tokens, top_k, offset, renormalize, dtype in cases:
        x = torch.randn(tokens, hidden, generator=g).to(dtype)
        w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
        w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
        total = experts + 2 * offset  # this rank holds [offset, offset + experts): ids on both sides are others'
        weights, ids = route(torch.randn(tokens, total, generator=g), Routing(total, top_k, renormalize, False))
        local = ids - offset
        got = moe_pairs.pair_experts(x, w13, w2, weights, local, small)
        want = grouped_experts(x.float(), w13.float(), w2.float(), weights, local, SiluAndMul())
        assert got.shape == x.shape and got.dtype == dtype and want.abs().max() > 0.1
        if offset:
            assert ((local < 0) | (local >= experts)).any()  # some pairs are another rank's
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
        if renormalize:  # the default blocks: one partial K step, one partial N block
            torch.testing.assert_close(moe_pairs.pair_experts(x, w13, w2, weights, local).float(), want,
                                       atol=tol, rtol=tol)

    top_k = 2
    limit = max(t for t in range(1, 9) if moe_pairs.serves(t, top_k, experts))
    assert limit == experts // 2 // top_k and not moe_pairs.serves(limit + 1, top_k, experts)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).half()
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).half()
    for tokens in (limit, limit + 1):
        x = torch.randn(tokens, hidden, generator=g).half()
        weights, ids = route(torch.randn(tokens, experts, generator=g), Routing(experts, top_k, True, False))
        aligned = aligned_experts(x, w13, w2, weights, ids)
        per_pair = moe_pairs.pair_experts(x, w13, w2, weights, ids)
        torch.testing.assert_close(per_pair.float(), aligned.float(), atol=2e-2, rtol=2e-2)
        want = per_pair if tokens == limit else aligned
        assert torch.equal(fused_experts(x, w13, w2, weights, ids, experts), want)
    print("pair_experts ok")


def test_pair_experts_equals_grouped_reference():
    run_interpreted("check_pair_experts", "test_fused_moe_interpreted")


def check_router() -> None:
    """moe_router.route == moe.route: the same expert ids in the same order, weights to float32 rounding, at 128
    experts top 8 and at expert counts that leave padding lanes (6 top 2, 60 top 4), renormalised or not, rounded
    to the logits' dtype or not, float32 and float16 logits on a strided view."""
    from worker_proc import moe_router
    from worker_proc.moe import Routing, route

    g = torch.Generator().manual_seed(3)
    for experts, top_k, renormalize, round_weights, dtype in ((128, 8, True, True, torch.float16),
                                                                (128, 8, False, False, torch.float32),
                                                                (6, 2, True, False, torch.float32),
                                                                (60, 4, False, True, torch.float16)):
        logits = torch.randn(5, experts + 3, generator=g).to(dtype)[:, :experts]
        want_w, want_ids = route(logits, Routing(experts, top_k, renormalize, round_weights))
        got_w, got_ids = moe_router.route(logits, top_k, renormalize, round_weights)
        assert torch.equal(got_ids, want_ids) and got_w.dtype == torch.float32
        torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-6)
    print("router ok")


def test_router_equals_torch_route():
    run_interpreted("check_router", "test_fused_moe_interpreted")
