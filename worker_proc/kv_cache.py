"""KV tensors of one TP rank: [layers] x [num_slots, kv_heads_local, head_dim], indexed by KV slot.

Slot 0 is a padding slot that the scheduler never hands out (padded batches write there).
With the host tier (--enable-hierarchical-cache) a second pool of the same layout lives in host memory (pinned
on CUDA), and each step's `kv_moves` copy slots between the two, started in order before its forward
(worker_proc/kv_host.py; scheduler_proc/host_tier.py decides them; every TP rank copies its own shard).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from radixserve.config import ServerArgs
from radixserve.wire import KVMove
from worker_proc import fused
from worker_proc.kv_host import HostPool

KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn}  # --kv-cache-dtype other than auto (the model's dtype)
FP8_MAX = 448.0


def kv_dtype_of(flag: str, model_dtype: torch.dtype) -> torch.dtype:
    return KV_DTYPES.get(flag, model_dtype)


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, num_host_slots: int = 0,
                 scales: dict[int, list[float]] | None = None, compute_dtype: torch.dtype | None = None) -> None:
        """`scales`: {layer: [k_scale, v_scale]} of an FP8 cache (layers not in it: 1.0); `compute_dtype`: the
        model's (queries, new K/V), where the cache's differs."""
        device = torch.device(device)
        self.compute_dtype = compute_dtype or dtype
        self.fp8 = dtype == torch.float8_e4m3fn
        self.scales = [tuple((scales or {}).get(i, (1.0, 1.0))) if self.fp8 else (1.0, 1.0)
                       for i in range(num_layers)]
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = device
        self.num_host_slots = num_host_slots  # 0: no host tier
        self.host = (HostPool(num_layers, num_host_slots, num_kv_heads, head_dim, _bytes(self.k[0]).dtype, device)
                     if num_host_slots else None)

    def move(self, moves: list[KVMove], load_waits: Sequence[int] = ()) -> None:
        """Ahead of a step's forward: wait for the loads it names, then start its copies between the pools, in order
        (worker_proc/kv_host.py)."""
        if not moves and not len(load_waits):
            return
        assert self.host is not None, "KV moves without a host pool"
        self.host.wait(load_waits)
        self.host.move(tuple(map(_bytes, (*self.k, *self.v))), moves)

    def unit_scales(self, layer_id: int) -> bool:
        return self.scales[layer_id] == (1.0, 1.0)

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K and V of new tokens into their slots (divided by an FP8 cache's scales)."""
        if not self.unit_scales(layer_id):
            k_scale, v_scale = self.scales[layer_id]
            k, v = k / k_scale, v / v_scale
        if fused.ENABLED and k.is_cuda:  # Triton's e4m3 conversion saturates
            fused.store_kv(self.k[layer_id], self.v[layer_id], slots, k, v)
            return
        # index_copy_ rather than an indexed assignment: on CPU the generic index_put_ path costs far more.
        slots = slots.long()
        _bytes(self.k[layer_id]).index_copy_(0, slots, _bytes(self._cast(k)))
        _bytes(self.v[layer_id]).index_copy_(0, slots, _bytes(self._cast(v)))

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-FP8_MAX, FP8_MAX).to(self.dtype) if self.fp8 else x.to(self.dtype)

    def read(self, layer_id: int, which: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `slots` of layer `layer_id`'s K (which=0) or V (1) in `dtype`, scaled back."""
        pool = (self.k, self.v)[which][layer_id]
        rows = _bytes(pool).index_select(0, slots).view(pool.dtype).to(dtype)
        scale = self.scales[layer_id][which]
        return rows if scale == 1.0 else rows * scale

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor as its bytes (CPU torch has no index_copy_ / index_select for float8 types)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def host_slots_wanted(args: ServerArgs, num_kv_slots: int, bytes_per_token: int) -> int:
    """The host tier's pool on this rank (+ its padding slot 0): --hicache-size GB, else --hicache-ratio × the
    device pool; 0 without the tier."""
    if not args.enable_hierarchical_cache:
        return 0
    n = (int(args.hicache_size * 1e9) // bytes_per_token if args.hicache_size
         else int(args.hicache_ratio * (num_kv_slots - 1)))
    return n + 1
