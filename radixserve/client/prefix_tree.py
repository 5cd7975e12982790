"""A local tracker of which sessions share token prefixes: a compressed radix tree over token ids.

Each edge holds a run of tokens (split where registered sequences diverge), and each node knows
the sessions whose registered sequence passes through it. A session has one registered sequence;
registering again replaces it (e.g. its conversation grew by a turn). This mirrors what the
server's radix cache can share, without asking the server.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise


@dataclass(frozen=True)
class PrefixStats:
    total_nodes: int
    """Nodes other than the root."""
    active_prefixes: int
    """Distinct registered sequences (sessions registering the same tokens count once)."""
    total_sessions: int
    """Sessions with a registered sequence."""
    max_depth: int
    """Tokens in the longest registered sequence."""


@dataclass(frozen=True)
class SharedPrefix:
    session_id: str
    length: int
    """Leading tokens the session's sequence has in common with the query."""


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...] = ()
    children: dict[int, _Node] = field(default_factory=dict)
    sessions: set[str] = field(default_factory=set)
    """Sessions whose sequence passes through or ends at this node."""
    ends: set[str] = field(default_factory=set)
    """Sessions whose sequence ends here."""


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixTree:
    """Thread-safe. Invariant: every node but the root is the end of a registered sequence or has at
    least two children, so the tree has at most two nodes per registered sequence."""

    def __init__(self) -> None:
        self._root = _Node()
        self._seqs: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    def register_prefix(self, session_id: str, token_ids: Sequence[int]) -> None:
        """Record `token_ids` as the session's sequence, replacing the one it had."""
        tokens = tuple(token_ids)
        if not tokens:
            raise ValueError("token_ids is empty")
        with self._lock:
            if session_id in self._seqs:
                self._remove(session_id)
            self._insert(session_id, tokens)
            self._seqs[session_id] = tokens

    def unregister(self, session_id: str) -> None:
        """Forget the session's sequence; KeyError if it has none."""
        with self._lock:
            self._remove(session_id)

    def find_sharing_sessions(self, token_ids: Sequence[int]) -> list[SharedPrefix]:
        """Sessions whose sequence shares at least one leading token with `token_ids`, longest
        shared prefix first (ties by session id)."""
        tokens = tuple(token_ids)
        shared: dict[str, int] = {}
        with self._lock:
            node, pos = self._root, 0
            while pos < len(tokens) and (child := node.children.get(tokens[pos])) is not None:
                matched = _common(child.key, tokens[pos:])
                pos += matched
                shared.update(dict.fromkeys(child.sessions, pos))  # deeper nodes overwrite with longer matches
                if matched < len(child.key):
                    break
                node = child
        return [SharedPrefix(s, n) for s, n in sorted(shared.items(), key=lambda item: (-item[1], item[0]))]

    def stats(self) -> PrefixStats:
        with self._lock:
            nodes, active, todo = 0, 0, list(self._root.children.values())
            while todo:
                node = todo.pop()
                nodes += 1
                active += bool(node.ends)
                todo += node.children.values()
            depth = max(map(len, self._seqs.values()), default=0)
            return PrefixStats(nodes, active, len(self._seqs), depth)

    def _insert(self, session_id: str, tokens: tuple[int, ...]) -> None:
        node, pos = self._root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                child = node.children[tokens[pos]] = _Node(tokens[pos:])
            matched = _common(child.key, tokens[pos:])
            if matched < len(child.key):  # diverges (or ends) inside the edge: split it
                head = _Node(child.key[:matched], {child.key[matched]: child}, set(child.sessions))
                child.key = child.key[matched:]
                child = node.children[tokens[pos]] = head
            child.sessions.add(session_id)
            node, pos = child, pos + matched
        node.ends.add(session_id)

    def _remove(self, session_id: str) -> None:
        tokens = self._seqs.pop(session_id)
        path, node, pos = [self._root], self._root, 0
        while pos < len(tokens):
            node = node.children[tokens[pos]]
            node.sessions.discard(session_id)
            path.append(node)
            pos += len(node.key)
        node.ends.discard(session_id)
        for parent, node in reversed(list(pairwise(path))):
            if not node.sessions:
                del parent.children[node.key[0]]
            elif not node.ends and len(node.children) == 1:  # no longer a branch point: merge with its child
                (child,) = node.children.values()
                node.key += child.key
                node.children, node.ends = child.children, child.ends
