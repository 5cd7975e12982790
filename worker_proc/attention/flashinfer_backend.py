"""FlashInfer attention over the paged KV cache (CUDA only; flashinfer is imported here and nowhere else).

Page size 1, NHD layout: a layer's K tensor [num_slots, kv_heads, head_dim] is viewed as
[num_slots, 1, kv_heads, head_dim], so page p is KV slot p and a request's page indices are its row
of req_to_token. `prepare` plans once per step; every layer's `forward` reuses that plan:
  decode (one new token per request): BatchDecodeWithPagedKVCacheWrapper on the tensor-core path, for every
    GQA group size: it reads the KV faster than the CUDA-core kernel (docs/benchmarks.md), which also rejects
    some group sizes (7, as in Qwen2.5-7B);
  extend / prefill: BatchPrefillWithPagedKVCacheWrapper with a causal mask aligned bottom-right, so the
    new tokens see the cached prefix and each other causally (the new K/V are stored before attending).
  cascade decode (a step whose StepBatch carries prefix groups): two BatchPrefillWithPagedKVCacheWrapper
    passes merged by their log-sum-exp. Level 0 attends each group's queries to the group's shared prefix,
    so that KV is read once per group (per 16-row query tile: 4 queries at GQA 4), not once per request;
    level 1 attends each request to the rest of its context, its own tokens.
An FP8 KV cache (--kv-cache-dtype fp8_e4m3) is planned with kv_data_type e4m3 and the model's dtype for q, on
FA2's kernels; a layer's k/v scales other than 1.0 go to each run() (the fused rotary + store, which writes
unscaled K/V, serves only layers without them).
Layer kinds (AttentionBackend.kinds: scale, sliding window, soft cap): FlashInfer fixes `window_left`,
`logits_soft_cap` and `sm_scale` when a wrapper is planned, so each kind has its own wrappers, all planned
over the same pages each step (a model with sliding and global layers plans two); layer i runs its kind's.
A window of W positions is FlashInfer's window_left = W - 1 (the query's own position plus W - 1 before
it). Cascade decode runs only for models of one kind without a window (its two levels split the context
at the shared prefix, which a window's left edge does not respect); others attend over whole contexts.
For CUDA graphs, `prepare_graph` plans a graph-mode decode wrapper per captured batch size, and for verify steps
(every request `width` tokens, verify_graphs.py) a graph-mode prefill wrapper per (batch size, width), causal, on
FA2's kernels (those of the tensor-core decode; on page-size-1 KV they read faster than the sm90 default); all of
them share one set of index buffers (only one graph replays at a time, each right after its plan; the kinds of one
graph plan the same pages into them). Cascade graphs have their own wrappers and buffers; their level 0
always has one entry per row of the padded batch: the real groups, then the padding rows as one group
attending to the padding slot, then groups of no rows.

Host syncs: none. Page indices are gathered on the device from req_to_token; plan() reads only host
arrays (indptr, lengths), which the worker already holds as numpy. FlashInfer's plan() takes `max()` of a
host tensor of lengths, which iterates it element by element in Python (each step, once per row); the module
global `max` of flashinfer.decode and flashinfer.prefill is replaced by one that reduces a lone tensor
argument with Tensor.max() (the same value) and is the builtin otherwise.
Invariant (FlashInfer plan copies its plan info from a pinned host buffer asynchronously): a wrapper is
planned at most once per step, and a step's plan waits for the event recorded after the previous step's plan
(ModelRunner.launch; steps no longer end with a host sync under overlap scheduling), so a plan never
overwrites host memory that a previous plan's copy still reads.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from worker_proc import fused
from worker_proc.attention.base import AttentionBackend, ForwardMeta, LayerAttention
from worker_proc.kv_cache import KVCache

WORKSPACE_BYTES = 256 << 20  # split-KV partial outputs; shared by every wrapper (they run one at a time)
PAGE_SIZE = 1


def gather_kv_indices(req_to_token: torch.Tensor, req_slots: torch.Tensor, seq_lens: torch.Tensor,
                      total: int, starts: torch.Tensor | None = None) -> torch.Tensor:
    """req_to_token[req_slots[i], starts[i]:starts[i] + seq_lens[i]] for every i (starts default to 0),
    concatenated ([total] int32, on the device).

    `total` = sum(seq_lens), known on the host; no host sync.
    """
    ends = torch.cumsum(seq_lens, 0, dtype=torch.int32)
    pos = torch.arange(total, dtype=torch.int32, device=seq_lens.device)
    req = torch.searchsorted(ends, pos, right=True)  # which request each context token belongs to
    col = pos - (ends - seq_lens)[req]
    if starts is not None:
        col += starts[req]
    return req_to_token[req_slots[req], col]


def _max(*args, **kwargs):
    """builtins.max, except that a lone tensor argument is reduced on the tensor (see the module docstring)."""
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        return args[0].max()
    return builtins.max(*args, **kwargs)


def indptr(lengths: np.ndarray) -> torch.Tensor:
    """[0, l0, l0+l1, ...] as a host int32 tensor."""
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return torch.from_numpy(out)


class Cascade:
    """Two planned prefill wrappers over one paged cache: level 1 (each request's own tokens) merged into
    level 0 (its group's shared prefix)."""

    def __init__(self, flashinfer, shared, own) -> None:
        self.merge, self.shared, self.own = flashinfer.merge_state_in_place, shared, own

    def run(self, q: torch.Tensor, pages: tuple[torch.Tensor, torch.Tensor], **scales: float) -> torch.Tensor:
        out, lse = self.own.run(q, pages, return_lse=True, **scales)
        shared_out, shared_lse = self.shared.run(q, pages, return_lse=True, **scales)
        self.merge(out, lse, shared_out, shared_lse)
        return out


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graph = True

    def __init__(self, kv_cache: KVCache, num_q_heads: int, head_dim: int, layers: Sequence[LayerAttention]) -> None:
        super().__init__(kv_cache, num_q_heads, head_dim, layers)
        self.supports_cascade = len(self.kinds) == 1 and self.kinds[0].window is None
        import flashinfer
        import flashinfer.decode
        import flashinfer.prefill

        flashinfer.decode.max = flashinfer.prefill.max = _max
        if kv_cache.compute_dtype not in (torch.bfloat16, torch.float16) or \
                kv_cache.dtype not in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
            raise ValueError(f"the flashinfer backend reads a bf16, fp16 or fp8_e4m3 KV cache of a bf16 or fp16 "
                             f"model, not {kv_cache.dtype} of {kv_cache.compute_dtype} (--dtype bfloat16, "
                             "--kv-cache-dtype auto or fp8_e4m3, or --attention-backend torch)")
        self._fi = flashinfer
        self.device = kv_cache.k[0].device
        self.num_kv_heads = kv_cache.k[0].shape[1]
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # An FP8 cache read by bf16 / fp16 queries: FA2's kernels (they widen the e4m3 K/V as they load them).
        self._wrapper_kw = {"backend": "fa2"} if kv_cache.fp8 else {}
        # Per layer, the FP8 cache's scales where they are not 1.0 (FlashInfer applies them to q.k and to the output).
        self._scales = [{} if kv_cache.unit_scales(i) else dict(zip(("k_scale", "v_scale"), kv_cache.scales[i]))
                        for i in range(len(layers))]
        # One eager wrapper of each sort per layer kind.
        self.prefill_wrappers = [flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                                **self._wrapper_kw)
                                 for _ in self.kinds]
        self.decode_wrappers = [flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                              use_tensor_cores=True,
                                                                              **self._wrapper_kw)
                                for _ in self.kinds]
        self.pages = [(k.unsqueeze(1), v.unsqueeze(1)) for k, v in zip(kv_cache.k, kv_cache.v)]
        self._plan_kw = [dict(q_data_type=kv_cache.compute_dtype, kv_data_type=kv_cache.dtype, sm_scale=kind.scale,
                              window_left=-1 if kind.window is None else kind.window - 1,
                              logits_soft_cap=kind.soft_cap) for kind in self.kinds]
        self.cascade = self._cascade() if self.supports_cascade else None
        self.graph_wrappers: dict[tuple[int, int], list[Any]] = {}  # (batch size, width) -> a wrapper per kind
        self.cascade_graphs: dict[int, Cascade] = {}
        self.active: list[Any] = []  # per layer kind, the wrapper planned for this step
        self.meta: ForwardMeta | None = None

    def _pages(self, meta: ForwardMeta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv indptr on the host, page indices on the device, last-page lengths (all 1) on the host)."""
        seq_lens = np.asarray(meta.seq_lens_cpu, dtype=np.int32)
        kv_indptr = indptr(seq_lens)
        indices = gather_kv_indices(meta.req_to_token, meta.req_slots, meta.seq_lens, int(kv_indptr[-1]))
        return kv_indptr, indices, torch.ones(len(seq_lens), dtype=torch.int32)

    def _cascade(self, bs: int | None = None) -> Cascade:
        """Eager wrappers, or (with `bs`) graph-mode ones over the shared cascade buffers at that batch size.
        The FA2 kernels: on page-size-1 KV they read faster than the sm90 default (see the module docstring)."""
        def wrapper(level: int):
            if bs is None:
                return self._fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
            qo, kv, idx = self._c_bufs[level]
            return self._fi.BatchPrefillWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=qo[:bs + 1], paged_kv_indptr_buf=kv[:bs + 1],
                paged_kv_indices_buf=idx, paged_kv_last_page_len_buf=self._g_last_len[:bs], backend="fa2")
        return Cascade(self._fi, wrapper(0), wrapper(1))

    def _plan_cascade(self, cascade: Cascade, meta: ForwardMeta, graph: bool) -> None:
        """Level 0: one entry per group (its rows, its shared prefix's pages, read from its first request's row);
        level 1: one per request (the pages after its group's prefix). In a graph, padding rows past the
        groups form one more group over the padding slot, and level 0 is filled up with entries of no rows."""
        sizes, shared = meta.prefix_groups[:, 0], meta.prefix_groups[:, 1]
        bs, real = meta.batch_size, int(sizes.sum())
        seq_lens = np.asarray(meta.seq_lens_cpu, dtype=np.int32)
        starts = np.zeros(bs, dtype=np.int32)
        starts[:real] = np.repeat(shared, sizes)
        leaders = np.cumsum(sizes, dtype=np.int32) - sizes
        if real < bs:  # graph padding rows (context: the padding slot alone)
            sizes, shared, leaders = (np.append(sizes, bs - real), np.append(shared, 1), np.append(leaders, real))
        if graph:
            empty = bs - len(sizes)
            sizes, shared = np.append(sizes, np.zeros(empty, np.int32)), np.append(shared, np.zeros(empty, np.int32))
        own = seq_lens - starts
        host = np.concatenate([leaders, shared[:len(leaders)], starts, own]).astype(np.int32)
        dev = meta.to_device(host)
        d_leaders, d_shared, d_starts, d_own = torch.split(dev, [len(leaders)] * 2 + [bs] * 2)
        shared_idx = gather_kv_indices(meta.req_to_token, meta.req_slots[d_leaders.long()], d_shared, int(shared.sum()))
        own_idx = gather_kv_indices(meta.req_to_token, meta.req_slots, d_own, int(own.sum()), d_starts)
        heads = (self.num_q_heads, self.num_kv_heads, self.head_dim, PAGE_SIZE)
        cascade.shared.plan(indptr(sizes), indptr(shared), shared_idx, torch.ones(len(sizes), dtype=torch.int32),
                            *heads, causal=False, **self._plan_kw[0])
        cascade.own.plan(indptr(np.ones(bs, np.int32)), indptr(own), own_idx, torch.ones(bs, dtype=torch.int32),
                         *heads, causal=False, **self._plan_kw[0])
        self.active = [cascade]
        self.meta = meta

    def prepare(self, meta: ForwardMeta) -> None:
        if meta.is_decode and meta.prefix_groups is not None:
            self._plan_cascade(self.cascade, meta, graph=False)
            return
        self._plan(self.decode_wrappers if meta.is_decode else self.prefill_wrappers, meta)

    def _plan(self, wrappers: list[Any], meta: ForwardMeta) -> None:
        """Plan each layer kind's wrapper (decode or prefill ones, as `meta` is) over the step's pages."""
        kv_indptr, indices, last_len = self._pages(meta)
        heads = (self.num_q_heads, self.num_kv_heads, self.head_dim, PAGE_SIZE)
        qo_indptr = None if meta.is_decode else indptr(np.asarray(meta.extend_lens_cpu, dtype=np.int32))
        for wrapper, kw in zip(wrappers, self._plan_kw):
            if qo_indptr is None:
                wrapper.plan(kv_indptr, indices, last_len, *heads, **kw)
            else:
                wrapper.plan(qo_indptr, kv_indptr, indices, last_len, *heads, causal=True, **kw)
        self.active = wrappers
        self.meta = meta

    # ------------------------------------------------------------ CUDA graphs (decode, verify)

    def init_graphs(self, max_bs: int, max_kv_tokens: int) -> None:
        """Index buffers shared by the graph-mode wrappers: up to `max_bs` requests, `max_kv_tokens` pages."""
        self.graph_wrappers = {}
        self._g_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)
        self._g_qo_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)  # verify graphs'
        self._g_indices = torch.zeros(max_kv_tokens, dtype=torch.int32, device=self.device)
        self._g_last_len = torch.ones(max_bs, dtype=torch.int32, device=self.device)
        self.cascade_graphs = {}
        self._c_bufs = [(torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
                         torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
                         torch.zeros(max_kv_tokens, dtype=torch.int32, device=self.device)) for _ in range(2)]

    def prepare_graph(self, meta: ForwardMeta) -> None:
        """Plan the graph-mode wrappers of exactly this (padded) batch: its size and, for a verify step (not
        decode), its requests' common number of tokens; capture or replay follows."""
        bs = meta.batch_size
        if meta.prefix_groups is not None:
            if bs not in self.cascade_graphs:
                self.cascade_graphs[bs] = self._cascade(bs)
            self._plan_cascade(self.cascade_graphs[bs], meta, graph=True)
            return
        key = (bs, 1 if meta.is_decode else meta.extend_lens_cpu[0])  # a graph's requests all have `width` tokens
        if key not in self.graph_wrappers:
            self.graph_wrappers[key] = [self._graph_wrapper(bs, meta.is_decode) for _ in self.kinds]
        self._plan(self.graph_wrappers[key], meta)

    def _graph_wrapper(self, bs: int, decode: bool) -> Any:
        """A graph-mode decode wrapper, or (verify steps) a prefill one, over the shared index buffers."""
        if decode:
            return self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=self._g_indptr[:bs + 1], paged_kv_indices_buffer=self._g_indices,
                paged_kv_last_page_len_buffer=self._g_last_len[:bs], **self._wrapper_kw)
        return self._fi.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=self._g_qo_indptr[:bs + 1],
            paged_kv_indptr_buf=self._g_indptr[:bs + 1], paged_kv_indices_buf=self._g_indices,
            paged_kv_last_page_len_buf=self._g_last_len[:bs], backend="fa2")

    # ------------------------------------------------------------ per layer

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        self.kv_cache.store(layer_id, self.meta.out_slots, k, v)
        return self.active[self.kind_of_layer[layer_id]].run(q, self.pages[layer_id], **self._scales[layer_id])

    def forward_rotary(self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       layer_id: int) -> torch.Tensor:
        if not fused.ENABLED or self._scales[layer_id]:  # the fused store writes unscaled K/V
            return super().forward_rotary(qk, v, cos, sin, layer_id)
        q = fused.rotary_store(qk, v, cos, sin, self.meta.out_slots, self.kv_cache.k[layer_id],
                               self.kv_cache.v[layer_id], self.num_q_heads)
        return self.active[self.kind_of_layer[layer_id]].run(q, self.pages[layer_id])
