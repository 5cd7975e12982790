"""Token-granular (page size 1) radix tree from token-id sequences to KV slots.

Every non-root node holds a non-empty `key` (token ids) and `value` (their KV slots), both
int32 arrays of equal length that the tree owns (never views of a caller's array). Children
are keyed by the first token of their key. `lock_ref` of a node counts the locks held on it or
on any node below it, so a node with `lock_ref > 0` is never evicted. The root is never evicted
and locking it is a no-op.
Access times come from a monotonic counter and never decrease from a child to its parent.
`depth` of a node is the length of the sequence from the root to its end (its parent's depth + len(key)).
With KV events on, each node also holds the hashes of the blocks that end in it (scheduler_proc/kv_blocks.py).
With the host tier (scheduler_proc/host_tier.py) a node's KV is in device slots (`value`), in host slots
(`host_value`), or in both (write-through policies); a host-only node (`value` None) has only host-only children,
`device_children` counts a node's device-resident ones, and `hits` the requests that matched it (for
write_through_selective). The sizes below count device-resident tokens only. A node moved back from the host tier
is `loading` (its device slots still being written) until its load is done, locked by that load meanwhile.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from radixserve.kv_events import DEVICE_MEDIUM, HOST_MEDIUM
from scheduler_proc.host_tier import HostTier
from scheduler_proc.kv_blocks import BlockEvents
from scheduler_proc.kv_slots import KVSlotAllocator
from scheduler_proc.radix_check import check_tree
from scheduler_proc.radix_node import EMPTY, MatchResult, TreeNode, as_tokens, common_prefix_len


class RadixCache:
    """Prefix cache of KV slots with LRU eviction of unlocked leaves.

    Evictable leaves (non-root, childless, `lock_ref == 0`) are tracked in a heap of
    `(access_time, id, node)` with lazy invalidation: an entry's time may be older than the
    node's (access times only grow), so a popped entry whose time is stale is pushed back with
    the current time, and an entry whose node is no longer an evictable leaf is dropped.
    """

    def __init__(self, allocator: KVSlotAllocator, events: BlockEvents | None = None,
                 host: HostTier | None = None) -> None:
        self._allocator = allocator
        self.events = events  # the block set KV events report, kept beside the tree (None: no events)
        self.host = host  # the host tier (None: an evicted node is dropped)
        if host is not None:
            host.events = events
        self._clock = 0
        self._root = TreeNode(EMPTY, EMPTY, None, 0)  # one root for life: callers may hold it
        self._clear()

    def _clear(self) -> None:
        self._root.children = {}
        self._root.device_children = 0
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
    def loads_in_flight(self) -> bool:
        return self.host is not None and bool(self.host.loading)

    @property
    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _push_if_evictable_leaf(self, node: TreeNode) -> None:
        """Track `node` if the device pool can evict it: device-resident, unlocked, no device-resident child
        (or, if it is host-resident, the host pool can)."""
        if node.value is None:
            if self.host is not None:
                self.host.push_if_leaf(node)
            return
        evictable_leaf = node.lock_ref == 0 and not node.device_children and node.parent is not None
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
        on_device = node.value is not None
        upper = TreeNode(node.key[:at].copy(), node.value[:at].copy() if on_device else None, parent,
                         node.last_access)
        upper.lock_ref, upper.hits, upper.loading = node.lock_ref, node.hits, node.loading
        upper.device_children = int(on_device)
        node.key = node.key[at:].copy()
        if on_device:
            node.value = node.value[at:].copy()
        if node.host_value is not None:
            upper.host_value, node.host_value = node.host_value[:at].copy(), node.host_value[at:].copy()
        node.parent = upper
        upper.children[int(node.key[0])] = node
        parent.children[int(upper.key[0])] = upper
        if self.events is not None:
            self.events.split(upper, node)
        return upper

    def _walk(self, key: np.ndarray, touch: bool = True) -> tuple[TreeNode, int, list[TreeNode]]:
        """Follow key down the tree. With `touch`, split where it ends or diverges inside a node.

        Every node on a touched path is fully covered and gets a fresh access time, so all tokens
        of a node always share one access time. Returns (deepest node, matched length, the path's nodes).
        """
        now = self._tick() if touch else 0
        node = self._root
        if touch:
            node.last_access = now
        path: list[TreeNode] = []
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
            path.append(child)
            node = child
            pos += m
        return node, pos, path

    def match_prefix(self, tokens: Sequence[int] | np.ndarray) -> MatchResult:
        """Longest cached prefix of tokens; splits the last node so the match ends on a node. A part in the host
        tier is moved back to device slots (evicting others) if they can be had, else the match ends above it; the
        match is `loading` while any of its nodes is (this load or an earlier one in flight: host_tier.py)."""
        key = as_tokens(tokens)
        node, _, path = self._walk(key)
        on_host = [n for n in path if n.value is None]  # after the device-resident ones
        loaded = 0
        if on_host and not self._load(on_host, key):
            node = on_host[0].parent
            path = path[:len(path) - len(on_host)]
        elif on_host:
            loaded = sum(len(n.key) for n in on_host)
        slots = np.concatenate([n.value for n in path]) if path else EMPTY.copy()
        loading = self.host is not None and bool(self.host.loading) and any(n.loading in self.host.loading
                                                                             for n in path)
        return MatchResult(slots, node, loaded, loading)

    def _load(self, nodes: list[TreeNode], key: np.ndarray) -> bool:
        """Start moving host-resident `nodes` (a path's tail, top down) back to device slots, as one load that locks
        them until it is done (finish_loads); False if too few slots can be had."""
        assert self.host is not None
        n = sum(len(node.key) for node in nodes)
        self.lock(nodes[-1])  # neither pool evicts the path meanwhile
        if self._allocator.num_free < n:
            self.evict(n - self._allocator.num_free)
        slots = self._allocator.alloc(n)
        if slots is None:
            self.unlock(nodes[-1])
            return False
        load = self.host.load(np.concatenate([node.host_value for node in nodes]), slots, nodes[-1])
        at = 0
        for node in nodes:
            node.loading = load
            self._to_device(node, slots[at:at + len(node.key)], key)
            at += len(node.key)
        return True

    def finish_loads(self, loads: Sequence[int] | np.ndarray) -> None:
        """The workers found these loads done (StepResult.loads_done): their paths may be read from the next step on
        (which waits for them on every rank: HostTier.load_waits) and evicted. An id no longer in flight (reported
        again, or cancelled by a flush) is skipped."""
        for load in map(int, loads):
            node = self.host.loading.pop(load, None)
            if node is not None:
                self.host.load_waits.append(load)
                self.unlock(node)

    def _to_device(self, node: TreeNode, slots: np.ndarray, key: np.ndarray) -> None:
        """Give host-only `node` the device slots `slots` (which hold its KV, or will once its load is done); its
        host copy is kept under a write-through policy, else freed (`key`: a sequence from the root through node,
        for the events)."""
        assert self.host is not None and node.value is None and node.host_value is not None
        if not self.host.write_through:
            self.host.free(node)
        node.value = slots.copy()
        if node.lock_ref:
            self._protected_size += len(node.key)
        else:
            self._evictable_size += len(node.key)
        node.parent.device_children += 1
        self._push_if_evictable_leaf(node)
        if self.events is not None:
            start = node.depth - len(node.key)
            self.events.moved(node, key[start - start % self.events.block_size:start], DEVICE_MEDIUM)

    def peek_prefix_len(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Length match_prefix would return, without splitting or touching access times."""
        return self._walk(as_tokens(tokens), touch=False)[1]

    def lock(self, node: TreeNode) -> None:
        """Protect node and its ancestors from eviction until the matching unlock."""
        if node is self._root:
            return
        if node.parent is None:
            raise RuntimeError(f"cannot lock {node}: it was evicted")
        node.held += 1
        while node is not self._root:
            if node.lock_ref == 0 and node.value is not None:
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
                if node.value is not None:
                    self._protected_size -= len(node.key)
                    self._evictable_size += len(node.key)
                self._push_if_evictable_leaf(node)
            node = node.parent

    def insert(self, tokens: Sequence[int] | np.ndarray, slots: np.ndarray, computed: bool = True) -> int:
        """Insert tokens with their KV slots; returns how many leading tokens were already cached on the device.

        The tree takes ownership of slots[returned:] (copied); the caller still owns the rest. Host-only nodes on
        the way take the caller's device slots (their host copies kept as a load keeps them). `computed`: the KV
        was computed by steps already sent, so a write-through policy may copy the path to the host now (not for a
        prompt part that the step being built computes: BlockTable.cache_computed).
        """
        key = as_tokens(tokens)
        value = np.asarray(slots, dtype=np.int32)
        if value.shape != key.shape:
            raise ValueError(f"{len(key)} tokens but {len(value)} slots")
        node, pos, path = self._walk(key)
        on_host = [n for n in path if n.value is None]
        cached = on_host[0].depth - len(on_host[0].key) if on_host else pos
        for n in on_host:  # the caller computed their KV again: keep its copy
            self._to_device(n, value[n.depth - len(n.key):n.depth], key)
        if pos < len(key):
            # The new leaf shares the walk's access time with the path above it.
            leaf = TreeNode(key[pos:].copy(), value[pos:].copy(), node, self._clock)
            node.children[int(key[pos])] = leaf
            node.device_children += 1
            self._evictable_size += len(leaf.key)
            self._push_if_evictable_leaf(leaf)
            if self.events is not None:
                self.events.stored(leaf, key, pos)
            path.append(leaf)
        if computed and self.host is not None:
            self.host.write_through_path(path)
        return cached

    def hit(self, node: TreeNode) -> None:
        """A request's prompt matched the path to `node`: count the hit on each of its nodes (O(depth)) and, under a
        write-through policy, copy those hit often enough to the host."""
        if self.host is None or not self.host.write_through:
            return
        path = []
        while node is not self._root:
            node.hits += 1
            path.append(node)
            node = node.parent
        self.host.write_through_path(path)

    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens device slots from unlocked nodes with no device-resident child, least recently
        used first. A node with a host copy keeps it (no copy now); one without is copied to the host under
        write_back, or if host-only children need it, when the host pool has room (made by its own LRU); else it is
        dropped.

        Returns the number freed: less only if nothing evictable is left.
        """
        freed: list[np.ndarray] = []
        num_freed = 0
        heap = self._heap
        while num_freed < num_tokens and heap:
            stamp, _, node = heapq.heappop(heap)
            node.in_heap = False
            if node.parent is None or node.lock_ref > 0 or node.device_children or node.value is None:
                continue
            if stamp != node.last_access:
                self._push_if_evictable_leaf(node)
                continue
            parent = node.parent
            host = self.host
            if host is not None and node.host_value is None and (not host.write_through or node.children):
                host.copy_to_host(node)
            if node.host_value is not None:
                if self.events is not None:
                    self.events.moved(node, self.events.above(node), HOST_MEDIUM)
            else:
                assert not node.children, "a host-resident child outlived its host pool's room"
                del parent.children[int(node.key[0])]
                if self.events is not None:
                    self.events.removed(node)
                node.parent = None
            freed.append(node.value)
            num_freed += len(node.value)
            self._evictable_size -= len(node.value)
            node.value = None
            parent.device_children -= 1
            self._push_if_evictable_leaf(node)
            self._push_if_evictable_leaf(parent)
        if freed:
            self._allocator.free(np.concatenate(freed))
        return num_freed

    def cancel_loads(self) -> None:
        """Forget the loads in flight and unlock the paths they held (a flush; the server stopping): a later step
        waits for their copies before any forward reuses the slots (HostTier.cancel_loads)."""
        for node in self.host.cancel_loads() if self.host is not None else []:
            self.unlock(node)

    def reset(self) -> None:
        """Drop every cached entry and free its slots (both tiers); raises if anything but a load in flight is locked.
        Loads in flight are cancelled first."""
        self.cancel_loads()
        if self._protected_size:
            raise RuntimeError(f"reset with {self._protected_size} locked tokens")
        freed, freed_host = [], []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.parent = None
            if node.value is not None:
                freed.append(node.value)
            if node.host_value is not None:
                freed_host.append(node.host_value)
        if freed:
            self._allocator.free(np.concatenate(freed))
        if freed_host:
            self.host.allocator.free(np.concatenate(freed_host))
        if self.host is not None:
            self.host.size, self.host.heap = 0, []
        self._clear()
        if self.events is not None:
            self.events.cleared()

    def check_invariants(self) -> np.ndarray:
        """Walk the whole tree, assert its consistency, and return every device slot it holds (int32)."""
        return check_tree(self._root, self._heap, self._allocator, self._evictable_size, self._protected_size,
                          self.events, self.host)
