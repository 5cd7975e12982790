"""The attention-backend interface: `prepare` once per step, then `forward` once per layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker_proc.kv_cache import KVCache
from worker_proc.layers import apply_rotary


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends: causal softmax(scale * q.k) over its request's context, and optionally

    `window`: only the last `window` positions, its own included (HF's sliding_window: key j is seen from
      query i when i - window < j <= i);
    `soft_cap`: scores pass through soft_cap * tanh(score / soft_cap) before the softmax (Gemma 2).
    Layers with equal LayerAttention share one plan per step in the backends (one "kind" each).
    """

    scale: float
    window: int | None = None
    soft_cap: float | None = None


@dataclass
class ForwardMeta:
    """Device tensors describing one step, built by the worker from a StepBatch.

    Request i owns rows qo_indptr[i]:qo_indptr[i+1] of q; after this step its context is
    seq_lens[i] tokens whose KV slots are req_to_token[req_slots[i], :seq_lens[i]]
    (the new tokens' slots, out_slots, are already written into that table).
    """

    is_decode: bool
    req_slots: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32, cached + extend
    extend_lens: torch.Tensor  # [B] int32
    qo_indptr: torch.Tensor  # [B+1] int32
    out_slots: torch.Tensor  # [T] int32 or int64, KV slot of each new token
    req_to_token: torch.Tensor  # [max_reqs, context_len] int32, the worker's mirror
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    # Decode with cascade attention: [G, 2] (rows, shared prefix tokens) per group of the real rows, in order.
    prefix_groups: np.ndarray | None = None
    # How the backends' own int32 host arrays of this step reach the device (`to_device`): the worker's pinned
    # staging (HostStaging.upload); None: a plain copy, which waits for the forward in flight.
    upload: Callable[[np.ndarray], torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    def to_device(self, host: np.ndarray) -> torch.Tensor:
        """An int32 host array on the device, through `upload` where the step has one."""
        return _to_device(host, self.upload, self.req_slots.device)

    @classmethod
    def for_positions(cls, req_to_token: torch.Tensor, req_slots: np.ndarray, cached: np.ndarray,
                      extend: np.ndarray, upload: Callable[[np.ndarray], torch.Tensor] | None = None,
                      extra: Sequence[np.ndarray] = ()) -> tuple[ForwardMeta, torch.Tensor, list[torch.Tensor]]:
        """A step over positions cached[i]:cached[i] + extend[i] of each request whose KV slots are in req_to_token
        already (a drafter's steps), those positions [T] on the device, and the `extra` int arrays on the device
        (int32), all in one `upload` (an int32 host array to the device: the drafters pass HostStaging.upload;
        by default a plain copy)."""
        bs, total = len(req_slots), int(extend.sum())
        qo = np.zeros(bs + 1, dtype=np.int64)
        np.cumsum(extend, out=qo[1:])
        positions = np.repeat(cached - qo[:-1], extend) + np.arange(total)
        host = np.concatenate([req_slots, cached + extend, extend, qo, positions, np.repeat(req_slots, extend),
                               *extra])
        slots, lens, ext, qo_d, pos, rows, *more = _to_device(host.astype(np.int32), upload, req_to_token.device).split(
            [bs, bs, bs, bs + 1, total, total, *(len(e) for e in extra)])
        meta = cls(is_decode=bool((extend == 1).all()), req_slots=slots, seq_lens=lens, extend_lens=ext,
                   qo_indptr=qo_d, out_slots=req_to_token[rows.long(), pos.long()], req_to_token=req_to_token,
                   seq_lens_cpu=(cached + extend).tolist(), extend_lens_cpu=extend.tolist(), upload=upload)
        return meta, pos, more


def _to_device(host: np.ndarray, upload: Callable[[np.ndarray], torch.Tensor] | None,
               device: torch.device) -> torch.Tensor:
    return upload(host) if upload is not None else torch.from_numpy(host).to(device)


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and attends over each request's context.

    A backend with `supports_cuda_graph` can run inside a captured decode or verify graph: `init_graphs` once, then
    `prepare_graph(meta)` (instead of `prepare`) before each capture or replay of a batch of that shape (a decode
    step, or a verify step whose requests all have the same number of tokens), where every device tensor of `meta`
    is a view at the same address as when the graph was captured.
    A backend with `supports_cascade` captures a second graph per size for decode steps with prefix groups.
    """

    supports_cuda_graph = False
    supports_cascade = False  # honours ForwardMeta.prefix_groups (others attend over whole contexts: same result)

    def __init__(self, kv_cache: KVCache, num_q_heads: int, head_dim: int, layers: Sequence[LayerAttention]) -> None:
        """`layers`: how each layer attends (the model's `attention_layers`), one entry per layer."""
        self.kv_cache = kv_cache
        self.num_q_heads = num_q_heads
        self.head_dim = head_dim
        self.kinds = tuple(dict.fromkeys(layers))  # distinct LayerAttention values, in first-layer order
        self.kind_of_layer = [self.kinds.index(layer) for layer in layers]
        self.layers = tuple(layers)

    @abstractmethod
    def prepare(self, meta: ForwardMeta) -> None:
        """Build per-step metadata once; every layer reuses it."""

    def init_graphs(self, max_bs: int, max_kv_tokens: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def prepare_graph(self, meta: ForwardMeta) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> output [T, Hq, D]; stores k/v at the step's out_slots."""

    def forward_rotary(self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       layer_id: int) -> torch.Tensor:
        """forward() after rotating qk [T, Hq + Hkv, D] (q heads then k heads) with apply_rotary's cos/sin.
        Backends may fuse the rotary with the KV store."""
        q, k = apply_rotary(qk, cos, sin).split([self.num_q_heads, qk.shape[1] - self.num_q_heads], dim=1)
        return self.forward(q, k, v, layer_id)
