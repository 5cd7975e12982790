"""The cached block set that KV events report (radixserve/kv_events.py), kept on the radix tree's nodes.

The tree has pages of one token; the events speak of blocks of `block_size` tokens along each cached sequence.
Block k of a sequence ends at depth (k+1)*block_size, so it belongs to the node whose tokens hold that depth:
a node covering depths (start, end] holds the blocks ending in that range (`node.blocks`, their hashes in order),
and `node.last_block` is the hash of the last block ending at or above its end (its own last, or its parent's).
So a block is in the tree exactly while the node holding its last token is, and every change is O(its blocks):
a new leaf stores the blocks ending in it, an evicted leaf removes its own, a split moves hashes between the two
halves and sends nothing, a flush clears all. Nothing walks the tree except `check`.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from radixserve.kv_events import (
    DEVICE_MEDIUM,
    HOST_MEDIUM,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    block_hash,
)


class TreeNode(Protocol):
    """What this module reads and writes of radix_node.TreeNode."""

    key: np.ndarray
    parent: Any  # a TreeNode (the root's children: the root)
    depth: int
    blocks: list[int]
    last_block: int | None


class BlockEvents:
    """The block bookkeeping of one radix tree and the events not yet taken (`take`)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = 0  # blocks in the tree, what a subscriber's rebuilt set holds
        self._pending: list[KVEvent] = []

    def take(self) -> tuple[float, list[KVEvent]]:
        """The events since the last take, in order, with the time they are taken."""
        events, self._pending = self._pending, []
        return time.time(), events

    def stored(self, leaf: TreeNode, key: np.ndarray, start: int) -> None:
        """`leaf`, just added under its parent, holds key[start:] (key: the whole sequence from the root)."""
        b = self.block_size
        parent_hash = leaf.parent.last_block
        first, end = start // b, len(key) // b  # blocks first..end-1 end in (start, len(key)]
        hashes, h = [], parent_hash
        for k in range(first, end):
            h = block_hash(h, key[k * b:(k + 1) * b])
            hashes.append(h)
        leaf.blocks = hashes
        leaf.last_block = h
        if hashes:
            self.num_blocks += len(hashes)
            self._pending.append(BlockStored(hashes, parent_hash, key[first * b:end * b].tolist(), b, lora_id=None,
                                             medium=DEVICE_MEDIUM, lora_name=None))

    def split(self, upper: TreeNode, lower: TreeNode) -> None:
        """`lower` was cut below `upper` (upper.depth set): the blocks ending above the cut move up."""
        start = upper.depth - len(upper.key)
        n = upper.depth // self.block_size - start // self.block_size
        upper.blocks, lower.blocks = lower.blocks[:n], lower.blocks[n:]
        upper.last_block = upper.blocks[-1] if upper.blocks else upper.parent.last_block

    def removed(self, leaf: TreeNode, medium: str = DEVICE_MEDIUM) -> None:
        """`leaf` left the tree (from `medium`): its blocks go."""
        if leaf.blocks:
            self.num_blocks -= len(leaf.blocks)
            self._pending.append(BlockRemoved(leaf.blocks, medium))

    def moved(self, node: TreeNode, above: np.ndarray, medium: str) -> None:
        """`node`'s KV moved to the tier `medium` (`above`: the tokens of the path above it that its first block
        starts in, depth % block_size of them): its blocks are removed from the other tier and stored in this."""
        if not node.blocks:
            return
        b = self.block_size
        self._pending.append(BlockRemoved(node.blocks, HOST_MEDIUM if medium == DEVICE_MEDIUM else DEVICE_MEDIUM))
        tokens = np.concatenate([above, node.key])[:len(node.blocks) * b]
        self._pending.append(BlockStored(node.blocks, node.parent.last_block, tokens.tolist(), b, lora_id=None,
                                         medium=medium, lora_name=None))

    def above(self, node: TreeNode) -> np.ndarray:
        """The tokens of the path above `node` that its first block starts in (what `moved` takes)."""
        need = (node.depth - len(node.key)) % self.block_size
        pieces, up, have = [], node.parent, 0
        while have < need:
            pieces.insert(0, up.key)
            have += len(up.key)
            up = up.parent
        return np.concatenate(pieces)[have - need:] if need else node.key[:0]

    def cleared(self) -> None:
        self.num_blocks = 0
        self._pending.append(AllBlocksCleared())

    def check(self, node: TreeNode, above: np.ndarray) -> np.ndarray:
        """Assert `node`'s blocks are those its path hashes to (`above`: the last block_size - 1 tokens or fewer
        of the path above it, the part of a block that may start there); returns the same for its children."""
        b = self.block_size
        start = node.depth - len(node.key)
        path = np.concatenate([above, node.key])  # depths (start - len(above), node.depth]
        offset = start - len(above)
        h = node.parent.last_block
        expected = []
        for k in range(start // b, node.depth // b):
            h = block_hash(h, path[k * b - offset:(k + 1) * b - offset])
            expected.append(h)
        assert node.blocks == expected, f"{node} holds blocks {node.blocks}, its path hashes to {expected}"
        assert node.last_block == h, f"{node} last block {node.last_block} != {h}"
        keep = node.depth % b
        return path[len(path) - keep:] if keep else path[:0]
