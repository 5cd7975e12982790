"""Batch-invariant attention on CUDA for --enable-deterministic-inference (Triton over the paged KV cache).

FlashInfer picks its query tile, its KV tile and its split of the KV by the step's shape (a decode step runs
other kernels than an extend; an extend's tiles depend on its lengths), so a row's softmax and weighted sum come
out in a different order, and with different bits, when its request is decoded, verified (speculative decoding),
served from the radix cache or prefilled in chunks. Here every step computes each row the same way:

- a tile is BLOCK_T consecutive new tokens of one request and one KV head; its ROWS = BLOCK_T x GROUP_PAD rows are
  those tokens' query heads of that KV head's group (GQA), padded;
- a row's context is cut at fixed positions into splits of `split` positions (a power of two set by the context
  length alone: `split_len`), each split walked in chunks of BLOCK_N positions from its start: scores by tl.dot
  over the head dimension, an online softmax (running maximum and sum per row), the weighted values by tl.dot
  over the chunk (`_split`); the splits' results are then merged in split order (`_merge`) and divided out.
- Two kernels run that arithmetic: `attend` walks a tile's splits one after the other in one program (large
  steps: the tiles fill the GPU); a small step (fewer than `split_below` tile x KV head programs: decode at small
  batches, where one program per KV head would leave most of the GPU idle) runs `attend_splits`, whose programs
  each compute some of the splits into a float32 workspace, then `merge_splits` merges them in split order. Both
  call the same `_split` and `_merge`, compiled without fused multiply-adds (COMPILE_OPTIONS: the compiler could
  fuse the merge's products and sums one way in one kernel and another way in the other), so a row gets the same
  bits from either.

Invariant (a row's bits depend only on its request's context and position): the tile shape, the split length and
the chunk boundaries are constants, so each row's dot products, its reductions along a chunk and its merges are
the same whatever the other rows of the tile are; a chunk or a whole split past a row's position leaves that row
exactly as it was (a running maximum starts at -1e30, finite, so such a split's maximum stays -1e30 and
merging it multiplies by exp2(0) = 1 and adds 0; a masked score's probability is 0 against finite values: a
chunk inside the tile's longest context holds written KV only).
K and V of the new tokens are stored before attending (the fused rotary + store where it runs). Covers the
model's dtype in the cache (no FP8 KV), no sliding window or soft cap; CUDA graphs (decode and verify) reuse their
tile lists and workspaces, which depend only on the batch size and tokens per request. triton is imported on
first use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from worker_proc import fused
from worker_proc.attention.base import AttentionBackend, ForwardMeta, LayerAttention
from worker_proc.kv_cache import KVCache

ROWS = 64  # query rows of a program's tile (tokens x padded GQA group)
BLOCK_N = 64  # context positions per chunk
MIN_SPLIT = 2 * BLOCK_N  # the shortest split
MAX_SPLITS = 1024  # a context of the model's length has at most this many splits (so does a graph's workspace)
SPLIT_BELOW = 128  # a step of fewer (tile, KV head) programs runs its splits in parallel (about an H100's SMs)
SPLIT_PROGRAMS = 256  # the programs such a step aims for
WORKSPACE_BYTES = 256 << 20  # the most a step's splits (or the graphs' shared ones) may hold in float32
COMPILE_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}  # no fused multiply-adds: see above


def split_len(context_length: int) -> int:
    """Positions per split for a model of this context length (the same for every step of the server)."""
    return max(MIN_SPLIT, fused.pow2(-(-context_length // MAX_SPLITS)))


def _kernels():
    from worker_proc.attention import invariant_kernels as k

    return k.attend, k.attend_splits, k.merge_splits


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
        self.split_below = SPLIT_BELOW
        self.meta: ForwardMeta | None = None
        self.tiles: torch.Tensor | None = None
        self.splits: Splits | None = None  # this step's splits in parallel, or None: one program per tile
        self._graphs: dict[tuple[int, int], tuple[torch.Tensor, Splits | None]] = {}
        self._graph_space: torch.Tensor | None = None  # the graphs' workspaces: one replays at a time

    def prepare(self, meta: ForwardMeta) -> None:
        self.meta, self.tiles = meta, tiles(meta, self.block_t)
        self.splits = self._splits(self.tiles.shape[1], sum(meta.extend_lens_cpu), max(meta.seq_lens_cpu, default=0),
                                   False)

    def init_graphs(self, max_bs: int, max_kv_tokens: int) -> None:
        self._graphs, self._graph_space = {}, None

    def prepare_graph(self, meta: ForwardMeta) -> None:
        """A graph's tiles and workspace depend only on its batch size and tokens per request (its contexts may
        reach the model's length): made at its capture, then kept (the replay reads them at the same address)."""
        key = (meta.batch_size, meta.extend_lens_cpu[0])
        self.meta = meta
        if key not in self._graphs:
            graph_tiles = tiles(meta, self.block_t)
            self._graphs[key] = graph_tiles, self._splits(graph_tiles.shape[1], sum(meta.extend_lens_cpu),
                                                          meta.req_to_token.shape[1], True)
        self.tiles, self.splits = self._graphs[key]

    @property
    def split(self) -> int:
        """Positions per split: set by the block table's width, the model's context length."""
        return split_len(self.meta.req_to_token.shape[1])

    def _splits(self, num_tiles: int, num_tokens: int, longest: int, graph: bool) -> Splits | None:
        """Splits in parallel for a step of `num_tiles` tiles whose longest context is `longest`, where it has fewer
        programs than `split_below`, a context of two splits or more, and a workspace of at most WORKSPACE_BYTES.
        A graph's workspace is a view of the graphs' shared one (grown where a graph needs more; a view keeps the
        storage it was cut from)."""
        programs = num_tiles * self.num_kv_heads
        count = -(-longest // self.split)
        rows = count * num_tokens * self.num_q_heads
        need = rows * (2 + self.d_pad)
        if programs >= self.split_below or count < 2 or 4 * need > WORKSPACE_BYTES:
            return None
        device = self.kv_cache.k[0].device
        if not graph:
            flat = torch.empty(need, dtype=torch.float32, device=device)
        else:
            if self._graph_space is None or self._graph_space.numel() < need:
                self._graph_space = torch.empty(need, dtype=torch.float32, device=device)
            flat = self._graph_space[:need]
        return Splits(min(count, max(1, SPLIT_PROGRAMS // programs)), flat[:rows].view(count, num_tokens, -1),
                      flat[rows:2 * rows].view(count, num_tokens, -1),
                      flat[2 * rows:].view(count, num_tokens, self.num_q_heads, self.d_pad))

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
        step = (self.tiles, meta.qo_indptr, meta.seq_lens, meta.extend_lens, meta.req_slots, meta.req_to_token,
                num_tiles)
        constants = dict(GROUP=self.group, GROUP_PAD=self.group_pad, BLOCK_T=self.block_t, D=self.head_dim,
                         D_PAD=self.d_pad, **COMPILE_OPTIONS)
        attend, attend_splits, merge_splits = _kernels()
        sp, r2t_stride = self.splits, meta.req_to_token.stride(0)
        if sp is None:
            attend[(num_tiles, self.num_kv_heads)](
                q, kc, vc, out, *step, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), out.stride(0),
                out.stride(1), r2t_stride, scale, self.split, **constants, BLOCK_N=BLOCK_N, num_stages=2)
            return out
        attend_splits[(num_tiles, self.num_kv_heads, sp.parts)](
            q, kc, vc, sp.tops, sp.totals, sp.accs, *step, self.num_q_heads, q.stride(0), q.stride(1), kc.stride(0),
            kc.stride(1), r2t_stride, sp.tops.stride(0), scale, self.split, **constants, BLOCK_N=BLOCK_N, num_stages=2)
        merge_splits[(num_tiles, self.num_kv_heads)](
            out, sp.tops, sp.totals, sp.accs, *step, self.num_q_heads, out.stride(0), out.stride(1), r2t_stride,
            sp.tops.stride(0), self.split, **constants)
        return out


class Splits(NamedTuple):
    """A step's splits computed in parallel: programs per (tile, KV head), and the float32 workspace of each
    split's per-row maximum, sum and weighted values (attend_splits' layout)."""

    parts: int
    tops: torch.Tensor
    totals: torch.Tensor
    accs: torch.Tensor
