"""Token-granular (page size 1) radix tree from token-id sequences to KV slots.

Every non-root node holds a non-empty `key` (token ids) and `value` (their KV slots), both
int32 arrays of equal length that the tree owns (never views of a caller's array). Children
are keyed by the first token of their key. `lock_ref` of a node counts the locks held on it or
on any node below it, so a node with `lock_ref > 0` is never evicted. The root is never evicted
and locking it is a no-op.
Access times come from a monotonic counter and never decrease from a child to its parent.
`depth` of a node is the length of the sequence from the root to its end (its parent's depth + len(key)).
With KV events on, each node also holds the hashes of the blocks that end in it (scheduler_proc/kv_blocks.py).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scheduler_proc.kv_blocks import BlockEvents
from scheduler_proc.kv_slots import KVSlotAllocator

_EMPTY = np.empty(0, dtype=np.int32)
_EMPTY.flags.writeable = False
_node_ids = itertools.count()


class TreeNode:
    __slots__ = ("key", "value", "parent", "children", "lock_ref", "held", "last_access",
                 "in_heap", "id", "depth", "blocks", "last_block")

    def __init__(self, key: np.ndarray, value: np.ndarray, parent: TreeNode | None,
                 last_access: int) -> None:
        self.key = key
        self.value = value
        self.parent = parent  # None for the root and for nodes removed from the tree
        self.depth = (parent.depth if parent is not None else 0) + len(key)
        self.blocks: list[int] = []  # hashes of the blocks ending in this node (KV events only)
        self.last_block: int | None = None  # hash of the last block ending at or above this node's end
        self.children: dict[int, TreeNode] = {}
        self.lock_ref = 0  # locks held on this node or below it
        self.held = 0  # locks held on this node itself
        self.last_access = last_access
        self.in_heap = False  # True iff exactly one entry for this node sits in the eviction heap
        self.id = next(_node_ids)  # heap tie-break, so equal access times order deterministically

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref})"


@dataclass(frozen=True, slots=True)
class MatchResult:
    slots: np.ndarray  # int32 KV slots of the longest cached prefix (a fresh copy)
    node: TreeNode  # deepest node covering the match, ending exactly at it (root if no match)


def _as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens, dtype=np.int32)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
    return arr


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class RadixCache:
    """Prefix cache of KV slots with LRU eviction of unlocked leaves.

    Evictable leaves (non-root, childless, `lock_ref == 0`) are tracked in a heap of
    `(access_time, id, node)` with lazy invalidation: an entry's time may be older than the
    node's (access times only grow), so a popped entry whose time is stale is pushed back with
    the current time, and an entry whose node is no longer an evictable leaf is dropped.
    """

    def __init__(self, allocator: KVSlotAllocator, events: BlockEvents | None = None) -> None:
        self._allocator = allocator
        self.events = events  # the block set KV events report, kept beside the tree (None: no events)
        self._clock = 0
        self._root = TreeNode(_EMPTY, _EMPTY, None, 0)  # one root for life: callers may hold it
        self._clear()

    def _clear(self) -> None:
        self._root.children = {}
        self._heap: list[tuple[int, int, TreeNode]] = []
        self._evictable_size = 0  # tokens in non-root nodes with lock_ref == 0
        self._protected_size = 0  # tokens in non-root nodes with lock_ref > 0

    @property
    def root(self) -> TreeNode:
        return self._root

    @property
    def evictable_size(self) -> int:
        return self._evictable_size

    @property
    def protected_size(self) -> int:
        return self._protected_size

    @property
    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _push_if_evictable_leaf(self, node: TreeNode) -> None:
        evictable_leaf = node.lock_ref == 0 and not node.children and node.parent is not None
        if evictable_leaf and not node.in_heap:
            node.in_heap = True
            heapq.heappush(self._heap, (node.last_access, node.id, node))

    def _split(self, node: TreeNode, at: int) -> TreeNode:
        """Cut node at `at` (0 < at < len(key)); returns the new upper node, the parent of node.

        node keeps its identity (and any heap entry or locks held on it); the new node inherits
        node's lock_ref and access time, so sizes and lock counts are unchanged.
        """
        parent = node.parent
        assert parent is not None and 0 < at < len(node.key)
        upper = TreeNode(node.key[:at].copy(), node.value[:at].copy(), parent, node.last_access)
        upper.lock_ref = node.lock_ref
        node.key = node.key[at:].copy()
        node.value = node.value[at:].copy()
        node.parent = upper
        upper.children[int(node.key[0])] = node
        parent.children[int(upper.key[0])] = upper
        if self.events is not None:
            self.events.split(upper, node)
        return upper

    def _walk(self, key: np.ndarray, touch: bool = True) -> tuple[TreeNode, int, list[np.ndarray]]:
        """Follow key down the tree. With `touch`, split where it ends or diverges inside a node.

        Every node on a touched path is fully covered and gets a fresh access time, so all tokens
        of a node always share one access time. Returns (deepest node, matched length, slot pieces).
        """
        now = self._tick() if touch else 0
        node = self._root
        if touch:
            node.last_access = now
        pieces: list[np.ndarray] = []
        pos = 0
        while pos < len(key):
            child = node.children.get(int(key[pos]))
            if child is None:
                break
            m = common_prefix_len(child.key, key[pos:])
            if not touch:
                pos += m
                if m < len(child.key):
                    break
                node = child
                continue
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = now
            pieces.append(child.value)
            node = child
            pos += m
        return node, pos, pieces

    def match_prefix(self, tokens: Sequence[int] | np.ndarray) -> MatchResult:
        """Longest cached prefix of tokens; splits the last node so the match ends on a node."""
        node, _, pieces = self._walk(_as_tokens(tokens))
        slots = np.concatenate(pieces) if pieces else _EMPTY.copy()
        return MatchResult(slots, node)

    def peek_prefix_len(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Length match_prefix would return, without splitting or touching access times."""
        return self._walk(_as_tokens(tokens), touch=False)[1]

    def lock(self, node: TreeNode) -> None:
        """Protect node and its ancestors from eviction until the matching unlock."""
        if node is self._root:
            return
        if node.parent is None:
            raise RuntimeError(f"cannot lock {node}: it was evicted")
        node.held += 1
        while node is not self._root:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Release one lock taken by lock(node); raises if node holds none."""
        if node is self._root:
            return
        if node.held <= 0:
            raise RuntimeError(f"unlock of {node} without a matching lock")
        node.held -= 1
        while node is not self._root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected_size -= len(node.key)
                self._evictable_size += len(node.key)
                self._push_if_evictable_leaf(node)
            node = node.parent

    def insert(self, tokens: Sequence[int] | np.ndarray, slots: np.ndarray) -> int:
        """Insert tokens with their KV slots; returns how many leading tokens were already cached.

        The tree takes ownership of slots[returned:] (copied); the caller still owns the rest.
        """
        key = _as_tokens(tokens)
        value = np.asarray(slots, dtype=np.int32)
        if value.shape != key.shape:
            raise ValueError(f"{len(key)} tokens but {len(value)} slots")
        node, pos, _ = self._walk(key)
        if pos < len(key):
            # The new leaf shares the walk's access time with the path above it.
            leaf = TreeNode(key[pos:].copy(), value[pos:].copy(), node, self._clock)
            node.children[int(key[pos])] = leaf
            self._evictable_size += len(leaf.key)
            self._push_if_evictable_leaf(leaf)
            if self.events is not None:
                self.events.stored(leaf, key, pos)
        return pos

    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots from unlocked leaves, least recently used first.

        Returns the number freed: less only if nothing evictable is left.
        """
        freed: list[np.ndarray] = []
        num_freed = 0
        heap = self._heap
        while num_freed < num_tokens and heap:
            stamp, _, node = heapq.heappop(heap)
            node.in_heap = False
            if node.parent is None or node.lock_ref > 0 or node.children:
                continue
            if stamp != node.last_access:
                self._push_if_evictable_leaf(node)
                continue
            parent = node.parent
            del parent.children[int(node.key[0])]
            if self.events is not None:
                self.events.removed(node)
            node.parent = None
            freed.append(node.value)
            num_freed += len(node.value)
            self._evictable_size -= len(node.value)
            self._push_if_evictable_leaf(parent)
        if freed:
            self._allocator.free(np.concatenate(freed))
        return num_freed

    def reset(self) -> None:
        """Drop every cached entry and free its slots; raises if anything is locked."""
        if self._protected_size:
            raise RuntimeError(f"reset with {self._protected_size} locked tokens")
        freed = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.parent = None
            freed.append(node.value)
        if freed:
            self._allocator.free(np.concatenate(freed))
        self._clear()
        if self.events is not None:
            self.events.cleared()

    def check_invariants(self) -> np.ndarray:
        """Walk the whole tree, assert its consistency, and return every slot it holds (int32)."""
        root = self._root
        assert root.parent is None and len(root.key) == 0 and len(root.value) == 0
        assert root.lock_ref == 0 and not root.in_heap
        evictable = protected = 0
        evictable_leaves: set[int] = set()
        in_heap: set[int] = set()
        pieces: list[np.ndarray] = []
        num_blocks = 0
        stack = [(root, _EMPTY)]  # with each node, the tail of its path that a block ending below may start in
        while stack:
            node, above = stack.pop()
            if node is not root and self.events is not None:
                above = self.events.check(node, above)
                num_blocks += len(node.blocks)
            child_locks = 0
            for first, child in node.children.items():
                assert child.parent is node, f"{child} has a wrong parent"
                assert len(child.key) > 0, f"{child} has an empty key"
                assert int(child.key[0]) == first, f"{child} keyed by {first}"
                assert child.last_access <= node.last_access, f"{child} newer than its parent"
                assert child.depth == node.depth + len(child.key), f"{child} at depth {child.depth}"
                child_locks += child.lock_ref
                stack.append((child, above))
            if node is root:
                continue
            assert node.key.dtype == np.int32 and node.value.dtype == np.int32
            assert len(node.key) == len(node.value), f"{node} key/value lengths differ"
            assert node.held >= 0 and node.lock_ref == node.held + child_locks, (
                f"{node} lock_ref {node.lock_ref} != held {node.held} + below {child_locks}")
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
                if not node.children:
                    evictable_leaves.add(node.id)
            if node.in_heap:
                in_heap.add(node.id)
            pieces.append(node.value)
        assert evictable == self._evictable_size, f"evictable {evictable} != {self._evictable_size}"
        assert protected == self._protected_size, f"protected {protected} != {self._protected_size}"
        assert self.events is None or num_blocks == self.events.num_blocks, "the block count is off"
        heap_ids = [node_id for _, node_id, _ in self._heap]
        assert len(heap_ids) == len(set(heap_ids)), "a node has two heap entries"
        assert set(heap_ids) == in_heap, "heap entries disagree with in_heap flags"
        assert evictable_leaves <= in_heap, "an evictable leaf is missing from the heap"
        assert all(stamp <= node.last_access for stamp, _, node in self._heap)
        slots = np.concatenate(pieces) if pieces else _EMPTY.copy()
        assert slots.size == 0 or (slots.min() >= 1 and slots.max() < self._allocator.num_slots)
        # Counting with bincount is O(slots); np.unique and np.intersect1d sort or hash (10x slower at 1M).
        counts = np.bincount(slots, minlength=self._allocator.num_slots)
        assert counts.max(initial=0) <= 1, "a slot appears twice in the tree"
        assert not counts[self._allocator.free_slots()].any(), "a cached slot is free"
        return slots
