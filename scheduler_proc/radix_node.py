"""The radix tree's node (its fields' rules: scheduler_proc/radix_cache.py) and the result of a match."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EMPTY = np.empty(0, dtype=np.int32)
EMPTY.flags.writeable = False
_node_ids = itertools.count()


class TreeNode:
    __slots__ = ("key", "value", "parent", "children", "lock_ref", "held", "last_access",
                 "in_heap", "id", "depth", "blocks", "last_block", "host_value", "device_children", "in_host_heap",
                 "hits", "loading")

    def __init__(self, key: np.ndarray, value: np.ndarray, parent: TreeNode | None,
                 last_access: int) -> None:
        self.key = key
        self.value = value
        self.parent = parent  # None for the root and for nodes removed from the tree
        self.depth = (parent.depth if parent is not None else 0) + len(key)
        self.blocks: list[int] = []  # hashes of the blocks ending in this node (KV events only)
        self.last_block: int | None = None  # hash of the last block ending at or above this node's end
        self.host_value: np.ndarray | None = None  # host slots, while the KV (also) is in the host tier
        self.hits = 1  # the request that cached it, then each one whose prompt matched it (RadixCache.hit)
        self.device_children = 0  # children whose KV is in device slots
        self.in_host_heap = False
        self.loading = 0  # the load that moved it back from the host tier (in flight while HostTier.loading has it)
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
    loaded: int = 0  # of those tokens, moved back from the host tier for this match
    loading: bool = False  # some of them are on their way from the host tier: not to be read yet


def as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens, dtype=np.int32)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
    return arr


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n
