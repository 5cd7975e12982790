"""worker_proc.moe.route in one Triton kernel (CUDA): softmax over the experts, top-k, the config's renormalisation
and rounding, one program per token, instead of torch's five to seven kernels per MoE layer.

The softmax is taken in float32 as torch's (exp(l - max) / sum); the top k are taken by k rounds of argmax, each
round masking out the expert it picked, so they come out in decreasing order as torch.topk's, and of equal
probabilities the lower expert id first (torch.topk leaves the order of ties unspecified). Renormalised weights
are w / sum(w) over the k; with `round_weights` they are rounded to the logits' dtype and back.
triton is imported lazily, on the first call.
"""

from __future__ import annotations

import functools

import torch

from worker_proc import fused


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def softmax_topk(logits_ptr, weights_ptr, ids_ptr, experts, stride_l, TOP_K: tl.constexpr,
                     RENORMALIZE: tl.constexpr, ROUND: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, E_PAD)
        logits = tl.load(logits_ptr + token * stride_l + lanes, mask=lanes < experts, other=-float("inf"))
        logits = logits.to(tl.float32)
        exp = tl.exp(logits - tl.max(logits, axis=0))
        probs = exp / tl.sum(exp, axis=0)
        left = tl.where(lanes < experts, probs, -1.0)  # padding lanes are never picked
        slots = tl.arange(0, K_PAD)
        weights = tl.zeros((K_PAD,), dtype=tl.float32)
        ids = tl.zeros((K_PAD,), dtype=tl.int64)
        for k in tl.static_range(TOP_K):
            best = tl.argmax(left, axis=0, tie_break_left=True)
            weights = tl.where(slots == k, tl.max(left, axis=0), weights)
            ids = tl.where(slots == k, best.to(tl.int64), ids)
            left = tl.where(lanes == best, -1.0, left)
        if RENORMALIZE:
            weights = weights / tl.sum(weights, axis=0)
        if ROUND:
            weights = weights.to(logits_ptr.dtype.element_ty).to(tl.float32)
        mask = slots < TOP_K
        tl.store(weights_ptr + token * TOP_K + slots, weights, mask=mask)
        tl.store(ids_ptr + token * TOP_K + slots, ids, mask=mask)

    return softmax_topk


def route(logits: torch.Tensor, top_k: int, renormalize: bool, round_weights: bool) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Router logits [T, E] (unit stride along E) -> (float32 weights [T, top_k], int64 expert ids [T, top_k]),
    as worker_proc.moe.route; see the module docstring."""
    tokens, experts = logits.shape
    assert logits.stride(1) == 1 and 0 < top_k <= experts
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int64, device=logits.device)
    if tokens:
        _kernel()[(tokens,)](logits, weights, ids, experts, logits.stride(0), TOP_K=top_k, RENORMALIZE=renormalize,
                             ROUND=round_weights, E_PAD=max(16, fused.pow2(experts)),
                             K_PAD=max(2, fused.pow2(top_k)), num_warps=4)
    return weights, ids
