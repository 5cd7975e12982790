"""What the workers' drafters (draft_model.py's STANDALONE model, eagle3_draft.py's EAGLE-3 head) share: a KV pool
with an entry per KV slot of the target's, its attention backend, and the plan discipline of its steps.

Invariant (FlashInfer's plan copies from a pinned host buffer asynchronously: flashinfer_backend.py): a drafter
plans several steps within one target step, so each of its plans first waits for the copy of its previous one.

Above the batch threshold (--speculative-batch-size-threshold) every step is plain decode and drafts nothing, so a
drafter does not compute those steps' tokens (`pass_over`, not `follow`): at batch 64 its forward would cost a step
a share that no draft repays. Its KV entries of those tokens stay as they were (stale): should a request speculate
again once the batch shrinks, its drafts read them and are accepted less often; verification keeps the tokens exact.
"""

from __future__ import annotations

import numpy as np
import torch

from worker_proc.attention import ForwardMeta, backend_class
from worker_proc.draft_graphs import DraftLoop
from worker_proc.kv_cache import KVCache
from worker_proc.layers import pack_cpu_linears
from worker_proc.step_io import HostStaging


class Drafter:
    """Subclasses set `model` (num_layers, num_kv_heads_local, num_q_heads_local, head_dim, attention_layers),
    `dtype` and `device`, and implement follow / propose (and admit / settle where they keep state)."""

    model: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    _planned: torch.cuda.Event | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        m = self.model
        return KVCache.bytes_per_token(m.num_layers, m.num_kv_heads_local, m.head_dim, self.dtype)

    def allocate(self, num_slots: int, backend_name: str, staging: HostStaging) -> None:
        """Its KV pool (one entry per slot of the target's) and attention backend; on a bf16 CPU its linear
        weights in the CPU kernels' layout, as the target's. Its index arrays reach the device through the
        runner's `staging` (its pinned ring: a pageable copy would make the host wait for the step on the device),
        one upload a call."""
        self.staging = staging
        m = self.model
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            pack_cpu_linears(m)
        self.kv_cache = KVCache(m.num_layers, num_slots, m.num_kv_heads_local, m.head_dim, self.dtype, self.device)
        self.attn = backend_class(backend_name)(self.kv_cache, m.num_q_heads_local, m.head_dim, m.attention_layers)

    def prepare(self, meta: ForwardMeta, graph: bool = False) -> None:
        """Plan the drafter's attention for `meta` (`graph`: its graph-mode wrappers, before a capture or replay)."""
        if self._planned is not None:
            self._planned.synchronize()
        if graph:
            self.attn.prepare_graph(meta)
        else:
            self.attn.prepare(meta)
        if self.device.type == "cuda":
            self._planned = torch.cuda.Event()
            self._planned.record()

    def admit(self, req_slots: np.ndarray) -> None:
        """Requests entering these req slots (no state per request by default)."""

    def draft_loop(self, max_bs: int, width: int, context_length: int) -> DraftLoop:
        """Its drafting of verify steps padded to a graph's shape, which a CUDA graph captures (draft_graphs.py;
        `draft_rows` is the captured forwards)."""
        raise NotImplementedError

    def draft_rows(self, ids: torch.Tensor, positions: torch.Tensor, req_slots: torch.Tensor, k: int) -> None:
        raise NotImplementedError

    def pass_over(self, a, d) -> None:
        """A plain decode step above the batch threshold, which the drafter does not compute (nothing by default:
        its KV of the step's tokens stays stale)."""

    def settle(self, a, drafts: np.ndarray, accepted: np.ndarray, input_ids: torch.Tensor,
               req_to_token: torch.Tensor) -> None:
        """After a verify step's acceptance (nothing by default); `input_ids` are its rows' (x_0, the drafts, per
        request)."""
