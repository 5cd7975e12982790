"""The host tier of the radix cache (`--enable-hierarchical-cache`): slots of the workers' host KV pool, the
host-resident nodes that hold them, and the copies between the pools that the workers are yet to make.

Every tree node lives in exactly one tier: its KV is in device slots (`node.value`) or in host slots
(`node.host_value`, `node.value` None). A node moves to the host when the device pool evicts it (only a node with
no device-resident child, so on every path the device-resident nodes come first) and back when a match reaches it
(radix_cache.py). Host-resident leaves are evicted from the host pool least recently used first, through a heap
with lazy invalidation as the device pool's. Each move is recorded in order (`moves`) and sent with the next step
(wire.StepBatch.kv_moves): the workers make the copies before that step's forward, in order, since a slot freed
by one move may be the destination of the next.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from radixserve.wire import KVMove, i32
from scheduler_proc.kv_slots import KVSlotAllocator


class HostTier:
    def __init__(self, num_slots: int) -> None:
        self.allocator = KVSlotAllocator(num_slots)
        self.size = 0  # tokens in host-resident nodes
        self.heap: list[tuple[int, int, Any]] = []  # (access time, id, node): host-resident leaves
        self.moves: list[KVMove] = []
        self.loaded_tokens = 0  # moved back to the device by matches (host hits), since start
        self.stored_tokens = 0  # moved to the host by device evictions, since start
        self.evicted_tokens = 0  # dropped from the host pool, since start

    def push_if_leaf(self, node: Any) -> None:
        """Track `node` if it is an evictable host-resident leaf."""
        if node.value is None and not node.children and node.lock_ref == 0 and node.parent is not None \
                and not node.in_host_heap:
            node.in_host_heap = True
            heapq.heappush(self.heap, (node.last_access, node.id, node))

    def pop_victim(self) -> Any | None:
        """The least recently used evictable host-resident leaf, taken out of the heap; None if there is none."""
        while self.heap:
            stamp, _, node = heapq.heappop(self.heap)
            node.in_host_heap = False
            if node.parent is None or node.value is not None or node.children or node.lock_ref:
                continue
            if stamp != node.last_access:
                self.push_if_leaf(node)
                continue
            return node
        return None

    def to_host(self, device_slots: np.ndarray, host_slots: np.ndarray) -> None:
        self.moves.append(KVMove(to_host=True, src=i32(device_slots), dst=i32(host_slots)))
        self.stored_tokens += len(host_slots)

    def to_device(self, host_slots: np.ndarray, device_slots: np.ndarray) -> None:
        self.moves.append(KVMove(to_host=False, src=i32(host_slots), dst=i32(device_slots)))

    def take_moves(self) -> list[KVMove]:
        moves, self.moves = self.moves, []
        return moves

    def check(self, host_slots: list[np.ndarray], host_leaves: set[int]) -> None:
        """The host slots of every host-resident node (`host_slots`) and the free ones partition the pool."""
        held = np.concatenate(host_slots) if host_slots else np.empty(0, dtype=np.int32)
        assert len(held) == self.size, f"host nodes hold {len(held)} slots, the tier counts {self.size}"
        parts = np.concatenate([held, self.allocator.free_slots()])
        assert len(parts) == self.allocator.capacity, f"host slots: {len(parts)} != {self.allocator.capacity}"
        counts = np.bincount(parts, minlength=self.allocator.num_slots)
        assert counts.max(initial=0) <= 1 and counts[0] == 0, "a host slot is held twice"
        in_heap = {node.id for _, _, node in self.heap}
        assert host_leaves <= in_heap, "an evictable host leaf is missing from the host heap"


def host_stats(host: HostTier | None) -> dict[str, int]:
    """The tier's sizes and moves as wire.SchedulerStats names them (zeros without the tier)."""
    if host is None:
        return dict.fromkeys(("max_host_tokens", "kv_host_cached_tokens", "host_stored_tokens", "host_loaded_tokens",
                              "host_evicted_tokens"), 0)
    return {"max_host_tokens": host.allocator.capacity, "kv_host_cached_tokens": host.size,
            "host_stored_tokens": host.stored_tokens, "host_loaded_tokens": host.loaded_tokens,
            "host_evicted_tokens": host.evicted_tokens}
