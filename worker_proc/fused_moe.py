"""The experts of a MoE layer on CUDA in Triton (the maths of worker_proc.moe.grouped_experts). Decode-sized
batches go one (token, expert) pair at a time (worker_proc.moe_pairs); larger ones as SGLang's fused MoE:

1. `align`: the T x top_k (token, expert) pairs, numbered p = t * top_k + k, sorted by expert; each expert's run
   padded to a multiple of BLOCK_M with the sentinel T * top_k, so every block of BLOCK_M sorted pairs belongs to
   one expert (`block_experts`, -1 for blocks past the end). Pairs of experts another rank holds (ids outside
   [0, E_local)) are left out. One Triton program for decode-sized batches, torch operators beyond; no host
   sync, and every size a function of T alone: the padded length is the worst case (`padded_length`).
2. `grouped_gemm` over x: row p of the output is x[p // top_k] @ W[expert]^T (gate_up, [T * top_k, 2I]).
3. SiLU-and-mul (worker_proc.fused), then `grouped_gemm` over that: row p is h[p] @ W2[expert]^T times the
   pair's routing weight ([T * top_k, H]; pairs of other ranks' experts stay zero).
4. The sum over each token's top_k rows, in float32.
Launch sizes depend only on T, so the whole path can be captured in a CUDA graph at a padded batch.
triton is imported lazily, on the first call (TRITON_INTERPRET=1 runs it on the CPU, for tests).
"""

from __future__ import annotations

import functools

import torch

from worker_proc import fused, moe_pairs


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_gemm(a_ptr, w_ptr, c_ptr, route_w_ptr, sorted_ptr, block_expert_ptr, n_pairs, N, K, a_div,
                     stride_am, stride_we, stride_wn, stride_cm, MUL_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """c[p] = a[p // a_div] @ w[e]^T (x route_w[p]) for the sorted pairs p of block program_id(0), whose
        expert is e; w [E, N, K] with unit stride along K."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if expert < 0:
            return
        pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = pair < n_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + (pair // a_div)[:, None] * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if MUL_WEIGHT:
            acc = acc * tl.load(route_w_ptr + pair, mask=mask_m, other=0.0)[:, None]
        tl.store(c_ptr + pair[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def align_pairs(ids_ptr, sorted_ptr, block_expert_ptr, n, num_local, padded_len, BLOCK_M: tl.constexpr,
                    E_PAD: tl.constexpr, CHUNK: tl.constexpr):
        """One program: count each local expert's pairs, lay the experts' runs out padded to BLOCK_M, write each
        block's expert, fill with the sentinel n, then scatter every pair p to its expert's next slot (in the
        order of p: a pair's slot is its expert's start plus the number of earlier pairs of that expert)."""
        experts = tl.arange(0, E_PAD)
        lanes = tl.arange(0, CHUNK)
        counts = tl.zeros((E_PAD,), dtype=tl.int32)
        for p0 in range(0, n, CHUNK):  # ids outside [0, num_local) and lanes past n (-1) match no expert
            key = tl.load(ids_ptr + p0 + lanes, mask=p0 + lanes < n, other=-1)
            counts += tl.sum(((key[:, None] == experts[None, :]) & (experts[None, :] < num_local)).to(tl.int32), 0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        padded_end = tl.cumsum(padded, axis=0)
        ends = tl.where(experts < num_local, padded_end, 2**30)
        num_blocks = padded_len // BLOCK_M
        for b0 in range(0, num_blocks, CHUNK):  # a block's expert: how many runs end at or before its start
            blocks = b0 + lanes
            e = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + blocks, tl.where(e < num_local, e, -1), mask=blocks < num_blocks)
        for i0 in range(0, padded_len, CHUNK):
            tl.store(sorted_ptr + i0 + lanes, tl.zeros((CHUNK,), dtype=tl.int32) + n, mask=i0 + lanes < padded_len)
        tl.debug_barrier()  # the sentinel stores land before the pairs' stores over them
        cursor = padded_end - padded  # each expert's next free slot
        for p0 in range(0, n, CHUNK):
            pairs = p0 + lanes
            key = tl.load(ids_ptr + pairs, mask=pairs < n, other=-1)
            hit = ((key[:, None] == experts[None, :]) & (experts[None, :] < num_local)).to(tl.int32)
            slot = tl.cumsum(hit, axis=0) - hit + cursor[None, :]
            tl.store(sorted_ptr + tl.sum(hit * slot, axis=1), pairs, mask=tl.sum(hit, axis=1) > 0)
            cursor += tl.sum(hit, axis=0)

    return grouped_gemm, align_pairs


def block_m_for(tokens: int) -> int:
    """Rows per block: small for decode batches (few pairs per expert, less padding), larger for prefill."""
    return 16 if tokens <= 64 else 64


ALIGN_KERNEL_PAIRS = 1024
"""`align` runs one Triton program up to this many pairs (decode batches: one launch instead of ~35 small torch
kernels); beyond, where one program's sequential sweeps would take longer than the torch kernels, torch's."""


def padded_length(n: int, num_local: int, block_m: int) -> int:
    """The aligned length of n pairs: n + min(n, E_local) * (block_m - 1) rounded up to block_m; at most
    min(n, E_local) experts have pairs, and each run is padded by less than block_m."""
    return -(-(n + min(n, num_local) * (block_m - 1)) // block_m) * block_m


def align(local_ids: torch.Tensor, num_local: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pairs [padded_length], expert of each block of block_m) for ids [T, top_k]; see the module
    docstring. Within an expert the pairs keep their order p."""
    flat = local_ids.flatten()
    n = flat.numel()
    padded_len = padded_length(n, num_local, block_m)
    if n <= ALIGN_KERNEL_PAIRS:
        return align_one_program(flat, num_local, block_m, padded_len)
    return align_torch(flat, num_local, block_m, padded_len)


def align_one_program(flat: torch.Tensor, num_local: int, block_m: int,
                      padded_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`align` in one Triton program (`_kernels`'s align_pairs), bit for bit as align_torch."""
    sorted_pairs = torch.empty(padded_len, dtype=torch.int32, device=flat.device)
    block_experts = torch.empty(padded_len // block_m, dtype=torch.int32, device=flat.device)
    if padded_len:
        e_pad = max(16, fused.pow2(num_local))
        _kernels()[1][(1,)](flat.contiguous(), sorted_pairs, block_experts, flat.numel(), num_local, padded_len,
                            BLOCK_M=block_m, E_PAD=e_pad, CHUNK=min(128, max(16, 8192 // e_pad)), num_warps=8)
    return sorted_pairs, block_experts


def align_torch(flat: torch.Tensor, num_local: int, block_m: int,
                padded_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`align` in torch operators (any number of pairs)."""
    n = flat.numel()
    key = torch.where((flat >= 0) & (flat < num_local), flat, num_local)  # num_local: another rank's expert
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded_end = ((counts[:num_local] + block_m - 1) // block_m * block_m).cumsum(0)
    padded_start = torch.cat((padded_end.new_zeros(1), padded_end[:-1]))
    first = counts.cumsum(0) - counts  # where each expert's pairs begin in the sorted order
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    mine = sorted_key < num_local
    dest = padded_start[sorted_key.clamp(max=num_local - 1)] + torch.arange(n, device=flat.device) - first[sorted_key]
    sorted_pairs = torch.full((padded_len + 1,), n, dtype=torch.int32, device=flat.device)
    sorted_pairs.scatter_(0, torch.where(mine, dest, padded_len), torch.where(mine, order, n).to(torch.int32))
    block_start = torch.arange(0, padded_len, block_m, device=flat.device)
    block_experts = torch.searchsorted(padded_end, block_start, right=True)
    block_experts = torch.where(block_experts < num_local, block_experts, -1).to(torch.int32)
    return sorted_pairs[:padded_len], block_experts


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, sorted_pairs: torch.Tensor, block_experts: torch.Tensor,
                 a_div: int, n_pairs: int, block_m: int, route_weights: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """out[p] = a[p // a_div] @ w[expert(p)]^T (times route_weights[p]) for every sorted pair; rows of pairs
    not in `sorted_pairs` are left as they were in `out` (new rows: uninitialised)."""
    kernel = _kernels()[0]
    n, k = w.shape[1], w.shape[2]
    assert a.stride(1) == 1 and w.is_contiguous()
    if out is None:
        out = torch.empty((n_pairs, n), dtype=a.dtype, device=a.device)
    block_n, block_k = 64, 64
    grid = (block_experts.numel(), -(-n // block_n))
    if n_pairs:
        kernel[grid](a, w, out, route_weights if route_weights is not None else a, sorted_pairs, block_experts,
                     n_pairs, n, k, a_div, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
                     MUL_WEIGHT=route_weights is not None,
                     PRECISION="ieee" if a.dtype == torch.float32 else None,  # float32: no TF32 rounding
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  local_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """worker_proc.moe.grouped_experts's result for x [T, H] (unit stride along H) routed among `num_experts`
    (all ranks'): a decode-sized batch one pair at a time (worker_proc.moe_pairs, where `moe_pairs.serves`),
    larger ones through the aligned grouped GEMMs. The choice depends on the shapes alone (CUDA graphs)."""
    tokens, top_k = local_ids.shape
    if moe_pairs.serves(tokens, top_k, num_experts):
        return moe_pairs.pair_experts(x, w13, w2, weights, local_ids)
    return aligned_experts(x, w13, w2, weights, local_ids)


def aligned_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                    local_ids: torch.Tensor) -> torch.Tensor:
    """worker_proc.moe.grouped_experts's result for x [T, H] (unit stride along H), through the steps of the module
    docstring."""
    tokens, top_k = local_ids.shape
    n_pairs = tokens * top_k
    block_m = block_m_for(tokens)
    sorted_pairs, block_experts = align(local_ids, w13.shape[0], block_m)
    gate_up = grouped_gemm(x, w13, sorted_pairs, block_experts, top_k, n_pairs, block_m)
    act = fused.silu_and_mul(gate_up)
    down = torch.zeros((n_pairs, w2.shape[1]), dtype=x.dtype, device=x.device)
    grouped_gemm(act, w2, sorted_pairs, block_experts, 1, n_pairs, block_m,
                 weights.flatten().contiguous(), out=down)
    return down.view(tokens, top_k, w2.shape[1]).sum(dim=1, dtype=torch.float32).to(x.dtype)
