"""Batch-invariant attention on CUDA for --enable-deterministic-inference (Triton over the paged KV cache).

FlashInfer picks its query tile, its KV tile and its split of the KV by the step's shape (a decode step runs
other kernels than an extend; an extend's tiles depend on its lengths), so a row's softmax and weighted sum come
out in a different order, and with different bits, when its request is decoded, verified (speculative decoding),
served from the radix cache or prefilled in chunks. Here one kernel serves every step, with one tile shape:

- a program owns BLOCK_T consecutive new tokens of one request and one KV head; its ROWS = BLOCK_T x GROUP_PAD
  rows are those tokens' query heads of that KV head's group (GQA), padded;
- it walks the request's context from position 0 in chunks of BLOCK_N positions, the same chunks for every row:
  scores by tl.dot over the head dimension, an online softmax (running maximum and sum per row), the weighted
  values by tl.dot over the chunk; the last chunks past a row's own position are masked.

Invariant (a row's bits depend only on its request's context and position): the tile shape is a constant, so each
row's dot products, its reductions along a chunk and its chunk boundaries are the same whatever the other rows of
the tile are; a chunk entirely past a row's position leaves that row exactly as it was (its maximum is unchanged,
so the rescale factor is exp2(0) = 1, and its probabilities are 0 against finite values: a chunk inside the tile's
longest context holds written KV only). No split of the KV across programs: a long context is read by one
program per (tile, KV head), which costs parallelism at small batches; that cost is measured, not hidden.
K and V of the new tokens are stored before attending (the fused rotary + store where it runs). Covers the
model's dtype in the cache (no FP8 KV), no sliding window or soft cap; CUDA graphs (decode and verify) reuse their
tile lists, which depend only on the batch size and tokens per request. triton is imported on first use.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from worker_proc import fused
from worker_proc.attention.base import AttentionBackend, ForwardMeta, LayerAttention
from worker_proc.kv_cache import KVCache

ROWS = 64  # query rows of a program's tile (tokens x padded GQA group)
BLOCK_N = 64  # context positions per chunk


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def attend(q_ptr, k_ptr, v_ptr, o_ptr, tile_ptr, qo_ptr, seq_ptr, ext_ptr, req_ptr, r2t_ptr, num_tiles,
               stride_qt, stride_qh, stride_ks, stride_kh, stride_ot, stride_oh, stride_r2t, qk_scale,
               GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
               D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        b = tl.load(tile_ptr + tile)
        t0 = tl.load(tile_ptr + num_tiles + tile)
        qo_start = tl.load(qo_ptr + b)
        qo_end = tl.load(qo_ptr + b + 1)
        cached = tl.load(seq_ptr + b) - tl.load(ext_ptr + b)
        table = r2t_ptr + tl.load(req_ptr + b).to(tl.int64) * stride_r2t
        r = tl.arange(0, BLOCK_T * GROUP_PAD)
        token = t0 + r // GROUP_PAD
        head = kv_head * GROUP + r % GROUP_PAD
        row_ok = (token < qo_end) & (r % GROUP_PAD < GROUP)
        seen = cached + (token - qo_start) + 1  # this row attends to positions [0, seen)
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        q = tl.load(q_ptr + token.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        top = tl.full((BLOCK_T * GROUP_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_T * GROUP_PAD,), tl.float32)
        acc = tl.zeros((BLOCK_T * GROUP_PAD, D_PAD), tl.float32)
        end = cached + tl.minimum(t0 + BLOCK_T, qo_end) - qo_start  # the tile's longest context
        for start in range(0, end, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pos_ok = pos < end
            slots = tl.load(table + pos, mask=pos_ok, other=0).to(tl.int64)
            kv_mask = pos_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(pos[None, :] < seen[:, None], s, float("-inf"))
            new_top = tl.maximum(top, tl.max(s, axis=1))
            alpha = tl.exp2(top - new_top)
            p = tl.exp2(s - new_top[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            top = new_top
        out = acc / total[:, None]
        tl.store(o_ptr + token.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    return attend


def tiles(meta: ForwardMeta, block_t: int) -> torch.Tensor:
    """[2, num_tiles] int32 on the device: each tile's request and first new token (row of q), BLOCK_T tokens of
    one request per tile, request after request. Device ops only (the tile count comes from the host lengths)."""
    ext = meta.extend_lens.long()
    per_req = (ext + block_t - 1) // block_t
    count = sum(-(-n // block_t) for n in meta.extend_lens_cpu)
    device = ext.device
    req = torch.repeat_interleave(torch.arange(len(ext), device=device), per_req, output_size=count)
    first = torch.cumsum(per_req, 0) - per_req
    t0 = meta.qo_indptr.long()[req] + (torch.arange(count, device=device) - first[req]) * block_t
    return torch.stack([req, t0]).int()


class InvariantBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self, kv_cache: KVCache, num_q_heads: int, head_dim: int, layers: Sequence[LayerAttention]) -> None:
        super().__init__(kv_cache, num_q_heads, head_dim, layers)
        if any(kind.window is not None or kind.soft_cap is not None for kind in self.kinds):
            raise NotImplementedError("--enable-deterministic-inference covers no sliding window or soft cap yet")
        if kv_cache.fp8:
            raise ValueError("--enable-deterministic-inference: the batch-invariant attention reads the model's "
                             "dtype only (--kv-cache-dtype auto)")
        num_kv_heads = kv_cache.k[0].shape[1]
        self.group = num_q_heads // num_kv_heads
        self.group_pad = fused.pow2(self.group)
        self.block_t = max(1, ROWS // self.group_pad)
        self.d_pad = max(16, fused.pow2(head_dim))
        self.num_kv_heads = num_kv_heads
        self.meta: ForwardMeta | None = None
        self.tiles: torch.Tensor | None = None
        self._graph_tiles: dict[tuple[int, int], torch.Tensor] = {}

    def prepare(self, meta: ForwardMeta) -> None:
        self.meta, self.tiles = meta, tiles(meta, self.block_t)

    def init_graphs(self, max_bs: int, max_kv_tokens: int) -> None:
        self._graph_tiles = {}

    def prepare_graph(self, meta: ForwardMeta) -> None:
        """A graph's tiles depend only on its batch size and tokens per request: made at its capture, then kept
        (the replay reads them at the same address)."""
        key = (meta.batch_size, meta.extend_lens_cpu[0])
        if key not in self._graph_tiles:
            self._graph_tiles[key] = tiles(meta, self.block_t)
        self.meta, self.tiles = meta, self._graph_tiles[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        self.kv_cache.store(layer_id, self.meta.out_slots, k, v)
        return self._attend(q, layer_id)

    def forward_rotary(self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       layer_id: int) -> torch.Tensor:
        if not fused.ENABLED:
            return super().forward_rotary(qk, v, cos, sin, layer_id)
        q = fused.rotary_store(qk, v, cos, sin, self.meta.out_slots, self.kv_cache.k[layer_id],
                               self.kv_cache.v[layer_id], self.num_q_heads)
        return self._attend(q, layer_id)

    def _attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q [T, Hq, D] -> [T, Hq, D] over the contexts of the step's requests (their new K/V stored)."""
        meta, kc, vc = self.meta, self.kv_cache.k[layer_id], self.kv_cache.v[layer_id]
        out = torch.empty_like(q)
        num_tiles = self.tiles.shape[1]
        if num_tiles == 0:
            return out
        scale = self.layers[layer_id].scale * math.log2(math.e)
        _kernel()[(num_tiles, self.num_kv_heads)](
            q, kc, vc, out, self.tiles, meta.qo_indptr, meta.seq_lens, meta.extend_lens, meta.req_slots,
            meta.req_to_token, num_tiles, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), out.stride(0),
            out.stride(1), meta.req_to_token.stride(0), scale, GROUP=self.group, GROUP_PAD=self.group_pad,
            BLOCK_T=self.block_t, D=self.head_dim, D_PAD=self.d_pad, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2)
        return out
