"""Reference attention in plain torch (runs on CPU): gathers each request's KV through req_to_token.

On a bf16 CPU with cpu_kernels, decode steps and short extends read the paged cache in place instead (no
gather, one call per layer, the rotary and KV store fused before it); long extends keep SDPA, whose
matrix-product kernels win there. Layers with a sliding window mask out keys older than it; soft-capped
layers run the attention in explicit matrix products (SDPA has no soft cap); both stay off cpu_kernels.
With --enable-deterministic-inference every step takes one per-row path, whatever its extend lengths:
cpu_kernels' (each row sums its context in one order) where it runs, else batch_invariant.attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from worker_proc import batch_invariant, cpu_kernels
from worker_proc.attention.base import AttentionBackend, ForwardMeta, LayerAttention
from worker_proc.kv_cache import KVCache

NATIVE_MAX_EXTEND = 128
"""The longest extend (new tokens of one request) whose prefill attention runs in cpu_kernels: its per-row loop
costs O(context) per query row, SDPA's blocked kernel costs a call per request and layer."""


class TorchBackend(AttentionBackend):
    name = "torch"

    def __init__(self, kv_cache: KVCache, num_q_heads: int, head_dim: int, layers: Sequence[LayerAttention]) -> None:
        super().__init__(kv_cache, num_q_heads, head_dim, layers)
        cache = kv_cache.k[0]
        # Whether cpu_kernels can read this cache in place: fixed for the process (device, dtype, head shape,
        # every layer attending over its whole context without a soft cap).
        plain = all(kind.window is None and kind.soft_cap is None for kind in self.kinds)
        self.has_kernels = plain and cache.device.type == "cpu" and cpu_kernels.attention_fits(
            cache.dtype, num_q_heads, cache.shape[1], head_dim)
        if batch_invariant.ENABLED and not plain:
            raise NotImplementedError("--enable-deterministic-inference covers no sliding window or soft cap yet")
        if batch_invariant.ENABLED and kv_cache.fp8:
            raise ValueError("--kv-cache-dtype fp8_e4m3: the torch backend's batch-invariant attention reads the "
                             "model's dtype only (--kv-cache-dtype auto, or --attention-backend flashinfer)")

    def prepare(self, meta: ForwardMeta) -> None:
        self.meta = meta
        self.out_slots = meta.out_slots.long()
        self.invariant = batch_invariant.ENABLED and not self.has_kernels
        self.native = self.has_kernels and (batch_invariant.ENABLED or meta.is_decode
                                            or max(meta.extend_lens_cpu) <= NATIVE_MAX_EXTEND)
        if self.native or self.invariant:
            # One row per new token: its request's req slot and the context it sees (causal within the extend).
            if meta.is_decode:
                self.rows = (meta.req_slots, meta.seq_lens)
            else:
                req = torch.repeat_interleave(torch.arange(meta.batch_size), meta.extend_lens.long())
                own = torch.arange(len(req)) - meta.qo_indptr[req]
                self.rows = (meta.req_slots[req], (meta.seq_lens - meta.extend_lens)[req] + own.int() + 1)
        elif meta.is_decode:
            # One padded gather for the whole decode batch, as a flat index (index_select is the fast gather on
            # CPU); pad slot 0 is masked out.
            max_len = max(meta.seq_lens_cpu)
            rows = meta.req_to_token[meta.req_slots.long(), :max_len].long()
            pos = torch.arange(max_len, device=rows.device)[None, :]
            valid = pos < meta.seq_lens[:, None]
            self.ctx_slots = torch.where(valid, rows, torch.zeros_like(rows)).flatten()
            # One key mask per layer kind: a window also hides the keys before its last `window` positions.
            self.valid = [valid if kind.window is None else valid & (pos >= meta.seq_lens[:, None] - kind.window)
                          for kind in self.kinds]
            self.ctx_shape = (len(meta.seq_lens_cpu), max_len)
        else:
            self.ctx_slots_per_req = [
                meta.req_to_token[slot, :n].long()
                for slot, n in zip(meta.req_slots.tolist(), meta.seq_lens_cpu)
            ]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        self.kv_cache.store(layer_id, self.out_slots, k, v)
        return self._attend(q, layer_id)

    def forward_rotary(self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       layer_id: int) -> torch.Tensor:
        if not self.native:
            return super().forward_rotary(qk, v, cos, sin, layer_id)
        q = cpu_kernels.rotary_store(qk, v, cos, sin, self.out_slots, self.kv_cache.k[layer_id],
                                     self.kv_cache.v[layer_id], self.num_q_heads)
        return self._attend(q, layer_id)

    def _attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        """Attention of q over each request's context (this step's K/V already stored)."""
        meta, layer = self.meta, self.layers[layer_id]
        k_cache, v_cache = self.kv_cache.k[layer_id], self.kv_cache.v[layer_id]
        if self.native:
            return cpu_kernels.paged_attention(q, k_cache, v_cache, meta.req_to_token, *self.rows, layer.scale)
        if self.invariant:
            return batch_invariant.attention(q, k_cache, v_cache, meta.req_to_token, *self.rows, layer.scale)
        if meta.is_decode:
            batch, kv_heads = self.ctx_shape[0], k_cache.shape[1]
            shape = (*self.ctx_shape, *k_cache.shape[1:])
            # [B, Hkv, L, D]
            keys = self.kv_cache.read(layer_id, 0, self.ctx_slots, q.dtype).view(shape).transpose(1, 2)
            vals = self.kv_cache.read(layer_id, 1, self.ctx_slots, q.dtype).view(shape).transpose(1, 2)
            # The query heads that share a kv head (h // group) stand in for the query length: one attention of
            # `group` queries per kv head, several times faster on CPU than SDPA's enable_gqa with one query.
            grouped = q.view(batch, kv_heads, -1, q.shape[-1])
            out = attend(grouped, keys, vals, self.valid[self.kind_of_layer[layer_id]][:, None, None, :], layer)
            return out.reshape(q.shape)
        outs = []
        starts = [0]
        for n in meta.extend_lens_cpu:
            starts.append(starts[-1] + n)
        for i, slots in enumerate(self.ctx_slots_per_req):
            qi = q[starts[i]:starts[i + 1]].transpose(0, 1)  # [Hq, E, D]
            keys = self.kv_cache.read(layer_id, 0, slots, q.dtype).transpose(0, 1)  # [Hkv, L, D]
            vals = self.kv_cache.read(layer_id, 1, slots, q.dtype).transpose(0, 1)
            ext, total = qi.shape[1], keys.shape[1]
            q_pos = torch.arange(total - ext, total, device=q.device)
            k_pos = torch.arange(total, device=q.device)[None, :]
            mask = k_pos <= q_pos[:, None]
            if layer.window is not None:
                mask &= k_pos > q_pos[:, None] - layer.window
            # 4-D (a batch of one): CPU SDPA runs its flash kernel on 4-D inputs, its math fallback on 3-D ones.
            out = attend(qi[None], keys[None], vals[None], mask, layer)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs, dim=0)


def attend(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor,
           layer: LayerAttention) -> torch.Tensor:
    """softmax(scale * q k^T, soft-capped where the layer says, over `mask`) v: q [B, Hq, E, D], keys/vals
    [B, Hkv, L, D] (Hq a multiple of Hkv: query head h reads kv head h // (Hq / Hkv)), mask broadcast to
    [B, Hq, E, L]. Soft capping is HF's eager order: scale, cap, mask, softmax in float32."""
    if layer.soft_cap is None:
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=layer.scale, enable_gqa=True)
    group = q.shape[1] // keys.shape[1]
    keys, vals = keys.repeat_interleave(group, dim=1), vals.repeat_interleave(group, dim=1)
    scores = torch.tanh(q @ keys.transpose(-1, -2) * layer.scale / layer.soft_cap) * layer.soft_cap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ vals
