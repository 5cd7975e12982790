"""The host tier of the radix cache (`--enable-hierarchical-cache`): slots of the workers' host KV pool, the nodes
that hold them, when a node gets its host copy (`--hicache-write-policy`), and the copies between the pools that the
workers are yet to make.

A node's KV is in device slots (`node.value`), in host slots (`node.host_value`), or in both. Device-resident nodes
(value set) come first on every path (a device-resident node's parent is device-resident); a host-only node
(value None) is moved back when a match reaches it (radix_cache.py). When a node gets its host copy:
- write_back: as the device pool evicts it; a node is never in both tiers (a load frees the host copy).
- write_through: as its KV is cached by a finished request (BlockTable.release), so a later device eviction frees
  its device slots with no copy; a load keeps the host copy.
- write_through_selective: the same, once `node.hits` (the requests whose prompt matched it, counting the one that
  cached it) reaches WRITE_THROUGH_SELECTIVE_HITS, so only reused prefixes cost a copy.
Under the write-through policies a device eviction drops a node with no host copy (as under write_back when the
host pool is full), unless it has host-only children, which need it: then it is copied as under write_back.
Host-only leaves are evicted from the host pool least recently used first, through a heap with lazy invalidation
as the device pool's; a host copy of a device-resident node is never evicted from the host (it becomes evictable
once the device pool evicts the node), so a device-resident node keeps its host copy until then or a flush.
Each copy is recorded in order (`moves`) and sent with the next step (wire.StepBatch.kv_moves): the workers start them
in order after the forwards already sent and before that step's forward (a slot freed by one may be the next one's
destination), so a host copy reads KV that the forwards of earlier steps computed (`copy_to_host` is called only for
such KV, never for the step being built).
A copy back to the device (`load`) is a load in flight until rank 0 reports it done (StepResult.loads_done): it runs
beside the forwards of the steps in between, its nodes are `loading` (a match reaching them waits: the request that
asked for them is admitted once they are in place, and no other request waits for them) and locked by the load
itself (`loading`: id -> the deepest node loaded), so that neither an abort of that request nor an eviction frees a
slot the copy still writes. Once it is done (RadixCache.finish_loads) or cancelled by a flush, its id goes to the
next step's `load_waits`: every rank's forward waits for its own copy there, before any forward may read or reuse
those slots.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from radixserve.kv_events import HOST_MEDIUM
from radixserve.wire import KVMove, i32
from scheduler_proc.kv_blocks import BlockEvents
from scheduler_proc.kv_slots import KVSlotAllocator

WRITE_THROUGH_SELECTIVE_HITS = 2  # SGLang's write_through_threshold for write_through_selective
_HITS_FOR_A_COPY = {"write_through": 1, "write_through_selective": WRITE_THROUGH_SELECTIVE_HITS, "write_back": None}


class HostTier:
    def __init__(self, num_slots: int, write_policy: str = "write_back") -> None:
        self.allocator = KVSlotAllocator(num_slots)
        # Hits after which a device-resident node gets its host copy (None: only as the device pool evicts it).
        self.hits_for_a_copy: int | None = _HITS_FOR_A_COPY[write_policy]
        self.events: BlockEvents | None = None  # the tree's block set (set by RadixCache)
        self.size = 0  # tokens in host slots (host-only nodes and host copies of device-resident ones)
        self.heap: list[tuple[int, int, Any]] = []  # (access time, id, node): host-only leaves
        self.moves: list[KVMove] = []
        self.loading: dict[int, Any] = {}  # loads in flight: id -> the deepest node loaded, which the load locks
        self.load_waits: list[int] = []  # loads done or cancelled, for the next step's load_waits
        self._last_load = 0
        self.loaded_tokens = 0  # moved back to the device by matches (host hits), since start
        self.stored_tokens = 0  # copied to the host (device evictions under write_back, write-throughs), since start
        self.evicted_tokens = 0  # dropped from the host pool, since start

    @property
    def write_through(self) -> bool:
        return self.hits_for_a_copy is not None

    def push_if_leaf(self, node: Any) -> None:
        """Track `node` if it is an evictable host-only leaf."""
        if node.value is None and not node.children and node.lock_ref == 0 and node.parent is not None \
                and not node.in_host_heap:
            node.in_host_heap = True
            heapq.heappush(self.heap, (node.last_access, node.id, node))

    def pop_victim(self) -> Any | None:
        """The least recently used evictable host-only leaf, taken out of the heap; None if there is none."""
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

    def alloc(self, n: int) -> np.ndarray | None:
        """n host slots, evicting host-only leaves (least recently used first) to make room; None if they cannot be
        had."""
        while self.allocator.num_free < n and (victim := self.pop_victim()) is not None:
            parent = victim.parent
            del parent.children[int(victim.key[0])]
            if self.events is not None:
                self.events.removed(victim, HOST_MEDIUM)
            victim.parent = None
            self.free(victim)
            self.evicted_tokens += len(victim.key)
            self.push_if_leaf(parent)
        return self.allocator.alloc(n)

    def free(self, node: Any) -> None:
        """Free `node`'s host copy."""
        self.allocator.free(node.host_value)
        self.size -= len(node.host_value)
        node.host_value = None

    def copy_to_host(self, node: Any) -> bool:
        """Give device-resident `node` a host copy of its KV (computed by a step already sent); False if the host
        pool has no room for it."""
        slots = self.alloc(len(node.value))
        if slots is None:
            return False
        self.moves.append(KVMove(to_host=True, src=i32(node.value), dst=i32(slots)))
        self.stored_tokens += len(slots)
        self.size += len(slots)
        node.host_value = slots
        return True

    def write_through_path(self, nodes: list[Any]) -> None:
        """Under a write-through policy, give the device-resident `nodes` hit often enough their host copies."""
        if self.hits_for_a_copy is None:
            return
        for node in nodes:
            if node.host_value is None and node.value is not None and node.hits >= self.hits_for_a_copy:
                self.copy_to_host(node)

    def load(self, host_slots: np.ndarray, device_slots: np.ndarray, node: Any) -> int:
        """Record the copy of `host_slots` to `device_slots` (the path down to `node`, which the caller locked for
        the load); the load's id."""
        self._last_load += 1
        self.moves.append(KVMove(to_host=False, src=i32(host_slots), dst=i32(device_slots), load=self._last_load))
        self.loading[self._last_load] = node
        self.loaded_tokens += len(host_slots)
        return self._last_load

    def take_moves(self) -> list[KVMove]:
        moves, self.moves = self.moves, []
        return moves

    def cancel_loads(self) -> list[Any]:
        """A flush: forget the loads in flight; the nodes their locks hold, for the caller to unlock. A load not sent
        yet is never made; the next step waits for the copies of the others (their slots may be handed out at once)."""
        unsent = {m.load for m in self.moves if m.load in self.loading}
        self.moves = [m for m in self.moves if m.load not in unsent]
        self.load_waits.extend(load for load in self.loading if load not in unsent)
        nodes, self.loading = list(self.loading.values()), {}
        return nodes

    def take_load_waits(self) -> bytes:
        waits, self.load_waits = self.load_waits, []
        return i32(waits) if waits else b""

    def check(self, host_slots: list[np.ndarray], host_leaves: set[int]) -> None:
        """The host slots of every node that has them (`host_slots`) and the free ones partition the pool."""
        held = np.concatenate(host_slots) if host_slots else np.empty(0, dtype=np.int32)
        assert len(held) == self.size, f"nodes hold {len(held)} host slots, the tier counts {self.size}"
        parts = np.concatenate([held, self.allocator.free_slots()])
        assert len(parts) == self.allocator.capacity, f"host slots: {len(parts)} != {self.allocator.capacity}"
        counts = np.bincount(parts, minlength=self.allocator.num_slots)
        assert counts.max(initial=0) <= 1 and counts[0] == 0, "a host slot is held twice"
        in_heap = {node.id for _, _, node in self.heap}
        assert host_leaves <= in_heap, "an evictable host leaf is missing from the host heap"
        for load, node in self.loading.items():  # a load in flight holds a lock on the device-resident path it loads
            assert node.parent is not None and node.held > 0 and node.value is not None and node.loading == load, (
                f"load {load} lost {node}")
            assert load not in self.load_waits, f"load {load} is in flight and done"


def host_stats(host: HostTier | None) -> dict[str, int]:
    """The tier's sizes and moves as wire.SchedulerStats names them (zeros without the tier)."""
    if host is None:
        return dict.fromkeys(("max_host_tokens", "kv_host_cached_tokens", "host_stored_tokens", "host_loaded_tokens",
                              "host_evicted_tokens"), 0)
    return {"max_host_tokens": host.allocator.capacity, "kv_host_cached_tokens": host.size,
            "host_stored_tokens": host.stored_tokens, "host_loaded_tokens": host.loaded_tokens,
            "host_evicted_tokens": host.evicted_tokens}
