"""The radix tree's invariant walk (RadixCache.check_invariants): O(cache size), for tests and
--enable-invariant-checks."""

from __future__ import annotations

from typing import Any

import numpy as np

from scheduler_proc.host_tier import HostTier
from scheduler_proc.kv_blocks import BlockEvents
from scheduler_proc.kv_slots import KVSlotAllocator

_EMPTY = np.empty(0, dtype=np.int32)


def check_tree(root: Any, heap: list, allocator: KVSlotAllocator, evictable_size: int, protected_size: int,
               events: BlockEvents | None, host: HostTier | None) -> np.ndarray:
    """Assert the tree's consistency (its docstring's rules, the sizes, the heaps, the blocks of KV events, the
    host tier's slots: each node's host copy, if any, in slots of its own; a node whose load is in flight locked on the
    device) and return every device slot it holds."""
    assert root.parent is None and len(root.key) == 0 and len(root.value) == 0
    assert root.lock_ref == 0 and not root.in_heap
    evictable = protected = 0
    evictable_leaves: set[int] = set()
    in_heap: set[int] = set()
    pieces: list[np.ndarray] = []
    host_pieces: list[np.ndarray] = []
    host_leaves: set[int] = set()
    num_blocks = 0
    stack = [(root, _EMPTY)]  # with each node, the tail of its path that a block ending below may start in
    while stack:
        node, above = stack.pop()
        if node is not root and events is not None:
            above = events.check(node, above)
            num_blocks += len(node.blocks)
        child_locks = device_children = 0
        for first, child in node.children.items():
            assert child.parent is node, f"{child} has a wrong parent"
            assert len(child.key) > 0, f"{child} has an empty key"
            assert int(child.key[0]) == first, f"{child} keyed by {first}"
            assert child.last_access <= node.last_access, f"{child} newer than its parent"
            assert child.depth == node.depth + len(child.key), f"{child} at depth {child.depth}"
            assert node.value is not None or child.value is None, f"{child} on the device below a host node"
            child_locks += child.lock_ref
            device_children += child.value is not None
            stack.append((child, above))
        assert node.device_children == device_children, f"{node} counts {node.device_children} device children"
        if node is root:
            continue
        assert node.held >= 0 and node.lock_ref == node.held + child_locks, (
            f"{node} lock_ref {node.lock_ref} != held {node.held} + below {child_locks}")
        if host is not None and node.loading in host.loading:  # its KV on its way from the host tier
            assert node.value is not None and node.lock_ref > 0, f"{node} is loading, unlocked or not on the device"
        if node.host_value is not None:
            assert host is not None and node.host_value.dtype == np.int32 and len(node.host_value) == len(node.key)
            host_pieces.append(node.host_value)
        if node.value is None:  # only in the host tier
            assert node.host_value is not None and not node.in_heap, f"{node} is in no tier"
            if not node.children and not node.lock_ref:
                host_leaves.add(node.id)
            continue
        assert node.host_value is None or host.write_through, f"{node} is in both tiers under write_back"
        assert node.key.dtype == np.int32 and node.value.dtype == np.int32
        assert len(node.key) == len(node.value), f"{node} key/value lengths differ"
        if node.lock_ref:
            protected += len(node.key)
        else:
            evictable += len(node.key)
            if not node.device_children:
                evictable_leaves.add(node.id)
        if node.in_heap:
            in_heap.add(node.id)
        pieces.append(node.value)
    assert evictable == evictable_size, f"evictable {evictable} != {evictable_size}"
    assert protected == protected_size, f"protected {protected} != {protected_size}"
    assert events is None or num_blocks == events.num_blocks, "the block count is off"
    if host is not None:
        host.check(host_pieces, host_leaves)
    heap_ids = [node_id for _, node_id, _ in heap]
    assert len(heap_ids) == len(set(heap_ids)), "a node has two heap entries"
    assert set(heap_ids) == in_heap, "heap entries disagree with in_heap flags"
    assert evictable_leaves <= in_heap, "an evictable leaf is missing from the heap"
    assert all(stamp <= node.last_access for stamp, _, node in heap)
    slots = np.concatenate(pieces) if pieces else _EMPTY.copy()
    assert slots.size == 0 or (slots.min() >= 1 and slots.max() < allocator.num_slots)
    # Counting with bincount is O(slots); np.unique and np.intersect1d sort or hash (10x slower at 1M).
    counts = np.bincount(slots, minlength=allocator.num_slots)
    assert counts.max(initial=0) <= 1, "a slot appears twice in the tree"
    assert not counts[allocator.free_slots()].any(), "a cached slot is free"
    return slots
