"""KV tensors of one TP rank: [layers] x [num_slots, kv_heads_local, head_dim], indexed by KV slot.

Slot 0 is a padding slot that the scheduler never hands out (padded batches write there).
"""

from __future__ import annotations

import torch

from worker_proc import fused


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.dtype = dtype

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if fused.ENABLED and k.is_cuda:
            fused.store_kv(self.k[layer_id], self.v[layer_id], slots, k, v)
            return
        # index_copy_ rather than an indexed assignment: on CPU the generic index_put_ path costs far more.
        slots = slots.long()
        self.k[layer_id].index_copy_(0, slots, k.to(self.dtype))
        self.v[layer_id].index_copy_(0, slots, v.to(self.dtype))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
