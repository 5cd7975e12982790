"""The block table: one req_to_token row per admitted request, and the KV slots the rows hold.

req_to_token[row, pos] is the KV slot of token `pos` of the request in `row` (what a row holds: Req).
The workers mirror it (a step carries only the slots it changes: wire.StepBatch).

Invariant (check_invariants): every KV slot but the padding slot 0 is exactly one of free (the
allocator), in the radix tree (evictable or locked), or owned by a running request — its row's columns
[prefix_len, cached_len). Between steps, a row's columns [0, prefix_len) hold tree slots, never 0.
"""

from __future__ import annotations

import numpy as np

from scheduler_proc.counters import Counters
from scheduler_proc.kv_slots import KVSlotAllocator
from scheduler_proc.radix_cache import RadixCache
from scheduler_proc.radix_node import TreeNode
from scheduler_proc.request import Req


class BlockTable:
    """Rows of req_to_token for running requests, and the moves of KV slots between them, the allocator and
    the radix cache (which, with `use_cache` off, holds nothing)."""

    def __init__(self, num_rows: int, context_length: int, allocator: KVSlotAllocator, cache: RadixCache,
                 use_cache: bool, counters: Counters) -> None:
        self.req_to_token = np.zeros((num_rows, context_length), dtype=np.int32)
        self.num_rows = num_rows
        self.allocator = allocator
        self.cache = cache
        self.use_cache = use_cache
        self.counters = counters
        self._free_rows = list(range(num_rows - 1, -1, -1))  # popped from the end: rows 0, 1, 2, ... first

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def available(self) -> int:
        """KV slots to be had now: the free ones plus what eviction can free."""
        return self.allocator.num_free + self.cache.evictable_size

    def alloc(self, n: int) -> np.ndarray | None:
        """n KV slots, evicting from the cache if too few are free; None if they cannot be had."""
        if self.allocator.num_free < n:
            self.counters.evicted_tokens += self.cache.evict(n - self.allocator.num_free)
        return self.allocator.alloc(n)

    def bind(self, req: Req, prefix: np.ndarray, node: TreeNode | None) -> None:
        """Give `req` a row that starts with its cached prefix (the tree's slots, locked through `node`)."""
        req.req_slot = self._free_rows.pop()
        req.prefix_node = node
        req.prefix_len = req.cached_len = len(prefix)
        self.req_to_token[req.req_slot, :len(prefix)] = prefix

    def assign(self, req: Req, n: int) -> bool:
        """KV slots for req's next n tokens (columns [cached_len, cached_len + n)); False if they cannot be had."""
        slots = self.alloc(n)
        if slots is None:
            return False
        self.req_to_token[req.req_slot, req.cached_len:req.cached_len + n] = slots
        return True

    def assign_decode(self, rows: np.ndarray, columns: np.ndarray) -> None:
        """One KV slot at (rows[i], columns[i]) for each decoding request; the caller checked they fit."""
        slots = self.alloc(len(rows))
        if slots is None:
            raise AssertionError("decode checked that one slot per request is available")
        self.req_to_token[rows, columns] = slots

    def cache_computed(self, req: Req) -> None:
        """Hand the prompt KV computed so far to the tree now (not at finish), so that requests admitted
        meanwhile share it; the request keeps it locked."""
        key = req.token_slice(0, req.cached_len)
        if self.cache.peek_prefix_len(key) != req.prefix_len:
            return  # another request cached part of it meanwhile: ours is freed as duplicates at release
        self.cache.insert(key, self.req_to_token[req.req_slot, :req.cached_len], computed=False)
        node = self.cache.match_prefix(key).node
        self.cache.lock(node)
        self.cache.unlock(req.prefix_node)
        req.prefix_node, req.prefix_len = node, req.cached_len

    def trim(self, req: Req, kept: int) -> None:
        """As `req` ends (before `release`): drop output past `kept` tokens (a stop string matched earlier), and KV
        past the tokens it knows (a step still in flight computed KV for an input that was PENDING when the
        request ended). Frees what is dropped that the request owns; dropped tokens whose KV is in the tree (a
        re-admitted request's prefix holds output) stay there: that KV is valid, and prefix_node still locks it."""
        del req.output_ids[kept:]
        valid = min(req.cached_len, req.fill_len)
        own = max(valid, req.prefix_len)  # columns [prefix_len, cached_len) are the request's own
        self.allocator.free(self.req_to_token[req.req_slot, own:req.cached_len].copy())
        req.cached_len = valid
        req.prefix_len = min(req.prefix_len, valid)

    def release(self, req: Req) -> None:
        """Give back req's row; its computed KV goes into the tree (or is freed without a cache)."""
        assert req.req_slot >= 0, f"request {req.rid} released twice"
        slots = self.req_to_token[req.req_slot, :req.cached_len].copy()
        if self.use_cache:
            already = self.cache.insert(req.fill_ids()[:req.cached_len], slots)
            # The tree now owns slots[already:]; slots[prefix_len:already] duplicate its own.
            self.allocator.free(slots[req.prefix_len:already])
            self.cache.unlock(req.prefix_node)
        else:
            self.allocator.free(slots[req.prefix_len:])
        self._free_rows.append(req.req_slot)
        req.req_slot, req.cached_len, req.prefix_len, req.prefix_node = -1, 0, 0, None

    def check_invariants(self, running: list[Req]) -> None:
        """The slot partition above, walking the tree and every slot (O(cache size)); between steps only."""
        free = self.allocator.free_slots()
        cached = self.cache.check_invariants()
        owned = [self.req_to_token[r.req_slot, r.prefix_len:r.cached_len] for r in running]
        parts = np.concatenate([free, cached, *owned])
        capacity = self.allocator.capacity
        assert len(parts) == capacity, (
            f"slots: {len(free)} free + {len(cached)} cached + {sum(map(len, owned))} owned != {capacity}")
        assert len(parts) == 0 or 0 <= parts.min() <= parts.max() < self.allocator.num_slots, "a slot out of range"
        counts = np.bincount(parts, minlength=self.allocator.num_slots)  # O(n), where np.unique sorts or hashes
        assert counts.max(initial=0) <= 1, "a KV slot is counted twice"
        assert counts[0] == 0, "the padding slot was handed out"
        for r in running:
            assert r.prefix_len == 0 or (self.req_to_token[r.req_slot, :r.prefix_len] != 0).all()
        rows = [r.req_slot for r in running]
        assert len(set(rows)) == len(rows) and not set(rows) & set(self._free_rows), "a row is held twice"
        assert len(self._free_rows) + len(running) == self.num_rows
