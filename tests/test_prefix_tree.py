"""PrefixTree: the seed's register / find sharing / stats cases, and a hypothesis state machine
against a brute-force reference (a dict of sequences)."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from radixserve.client import PrefixStats, PrefixTree, SharedPrefix

SYSTEM = list(range(100, 164))  # a 64-token shared system prompt


def test_register_prefix() -> None:
    tree = PrefixTree()
    tree.register_prefix("a", SYSTEM + [1, 2, 3])
    tree.register_prefix("b", SYSTEM + [1, 2, 4])
    tree.register_prefix("c", [7, 8])
    # compressed: one edge per run of tokens, not a node per token
    assert tree.stats() == PrefixStats(total_nodes=4, active_prefixes=3, total_sessions=3, max_depth=67)
    tree.register_prefix("a", SYSTEM + [1, 2, 3, 9, 9])  # replaces a's sequence (its conversation grew)
    assert tree.stats() == PrefixStats(total_nodes=4, active_prefixes=3, total_sessions=3, max_depth=69)
    tree.register_prefix("d", SYSTEM + [1, 2, 4])  # the same tokens as b: one prefix, two sessions
    assert tree.stats() == PrefixStats(total_nodes=4, active_prefixes=3, total_sessions=4, max_depth=69)
    with pytest.raises(ValueError):
        tree.register_prefix("e", [])


def test_find_sharing_sessions() -> None:
    tree = PrefixTree()
    tree.register_prefix("a", SYSTEM + [1, 2, 3])
    tree.register_prefix("b", SYSTEM + [1, 5])
    tree.register_prefix("c", SYSTEM[:10])
    tree.register_prefix("d", [7, 8])
    assert tree.find_sharing_sessions(SYSTEM + [1, 2, 9]) == [
        SharedPrefix("a", 66), SharedPrefix("b", 65), SharedPrefix("c", 10)]
    assert tree.find_sharing_sessions(SYSTEM[:3]) == [SharedPrefix(s, 3) for s in "abc"]
    assert tree.find_sharing_sessions([7]) == [SharedPrefix("d", 1)]
    assert tree.find_sharing_sessions([9, 100]) == []
    assert tree.find_sharing_sessions([]) == []


def test_get_prefix_stats() -> None:
    tree = PrefixTree()
    assert tree.stats() == PrefixStats(0, 0, 0, 0)
    for i in range(8):
        tree.register_prefix(f"s{i}", SYSTEM + [i])
    assert tree.stats() == PrefixStats(total_nodes=9, active_prefixes=8, total_sessions=8, max_depth=65)
    for i in range(7):
        tree.unregister(f"s{i}")
    assert tree.stats() == PrefixStats(total_nodes=1, active_prefixes=1, total_sessions=1, max_depth=65)
    tree.unregister("s7")
    assert tree.stats() == PrefixStats(0, 0, 0, 0)
    with pytest.raises(KeyError):
        tree.unregister("s7")


def test_concurrent_registration() -> None:
    tree = PrefixTree()

    def work(t: int) -> None:
        for i in range(200):
            tree.register_prefix(f"{t}-{i % 20}", SYSTEM[: i % 17 + 1] + [t, i])
            if i % 3 == 0:
                tree.unregister(f"{t}-{i % 20}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    check_structure(tree)


# ---------------------------------------------------------------- property test


def reference_nodes(seqs: dict[str, tuple[int, ...]]) -> int:
    """Nodes of a compressed tree: registered sequences and the prefixes where sequences diverge."""
    ends = set(seqs.values())
    prefixes = {s[:k] for s in ends for k in range(1, len(s) + 1)}
    return sum(p in ends or len({s[len(p)] for s in ends if len(s) > len(p) and s[:len(p)] == p}) >= 2
               for p in prefixes)


def reference_sharing(seqs: dict[str, tuple[int, ...]], query: tuple[int, ...]) -> list[SharedPrefix]:
    shared = {s: len(os.path.commonprefix([seq, query])) for s, seq in seqs.items()}
    found = [SharedPrefix(s, n) for s, n in shared.items() if n > 0]
    return sorted(found, key=lambda f: (-f.length, f.session_id))


def check_structure(tree: PrefixTree) -> None:
    """Edges non-empty and keyed by their first token; every non-root node ends a sequence or branches;
    a node's sessions are those ending at it or below."""

    def walk(node: Any, is_root: bool) -> set[str]:
        below = set(node.ends)
        for first, child in node.children.items():
            assert child.key and child.key[0] == first
            below |= walk(child, False)
        if not is_root:
            assert node.ends or len(node.children) >= 2
            assert node.sessions == below
        return below

    assert walk(tree._root, True) == set(tree._seqs)


tokens = st.lists(st.integers(0, 3), min_size=1, max_size=8).map(tuple)
session_ids = st.sampled_from([f"s{i}" for i in range(6)])


class PrefixTreeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tree = PrefixTree()
        self.seqs: dict[str, tuple[int, ...]] = {}

    @rule(sid=session_ids, seq=tokens)
    def register(self, sid: str, seq: tuple[int, ...]) -> None:
        self.tree.register_prefix(sid, seq)
        self.seqs[sid] = seq

    @rule(sid=session_ids)
    def unregister(self, sid: str) -> None:
        if sid in self.seqs:
            self.tree.unregister(sid)
            del self.seqs[sid]
        else:
            with pytest.raises(KeyError):
                self.tree.unregister(sid)

    @rule(query=st.lists(st.integers(0, 3), max_size=10).map(tuple))
    def find(self, query: tuple[int, ...]) -> None:
        assert self.tree.find_sharing_sessions(query) == reference_sharing(self.seqs, query)

    @invariant()
    def matches_reference(self) -> None:
        check_structure(self.tree)
        assert self.tree.stats() == PrefixStats(
            total_nodes=reference_nodes(self.seqs), active_prefixes=len(set(self.seqs.values())),
            total_sessions=len(self.seqs), max_depth=max(map(len, self.seqs.values()), default=0))


TestPrefixTreeMachine = PrefixTreeMachine.TestCase
TestPrefixTreeMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
