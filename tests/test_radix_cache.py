"""Unit and property-based tests for the KV slot allocator and the radix cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler_proc.kv_slots import KVSlotAllocator
from scheduler_proc.radix_cache import RadixCache
from scheduler_proc.radix_node import MatchResult, TreeNode


def make(num_slots: int = 64) -> tuple[KVSlotAllocator, RadixCache]:
    alloc = KVSlotAllocator(num_slots)
    return alloc, RadixCache(alloc)


def put(alloc: KVSlotAllocator, cache: RadixCache, tokens: list[int]) -> np.ndarray:
    """Insert tokens the way the scheduler does: reuse the cached prefix, allocate the rest."""
    match = cache.match_prefix(tokens)
    new = alloc.alloc(len(tokens) - len(match.slots))
    assert new is not None
    slots = np.concatenate([match.slots, new])
    assert cache.insert(tokens, slots) == len(match.slots)
    return slots


# --- allocator -------------------------------------------------------------------------------

def test_alloc_never_partial_and_skips_padding_slot() -> None:
    alloc = KVSlotAllocator(5)
    assert alloc.capacity == 4 and alloc.num_free == 4
    got = alloc.alloc(3)
    assert got is not None and got.dtype == np.int32 and sorted(got.tolist()) == [1, 2, 3]
    assert alloc.alloc(2) is None and alloc.num_free == 1
    last = alloc.alloc(1)
    assert last is not None and last.tolist() == [4]
    assert alloc.alloc(1) is None
    assert alloc.alloc(0) is not None
    alloc.free(got)
    assert alloc.num_free == 3 and alloc.free_slots().tolist() == [1, 2, 3]
    alloc.check_invariants()


def test_double_free_and_bad_slots_raise() -> None:
    alloc = KVSlotAllocator(8)
    got = alloc.alloc(3)
    alloc.free(got[:1])
    with pytest.raises(RuntimeError):
        alloc.free(got[:1])
    with pytest.raises(ValueError):
        alloc.free(np.array([0], dtype=np.int32))
    with pytest.raises(ValueError):
        alloc.free(np.array([8], dtype=np.int32))
    alloc.check_invariants()
    assert alloc.num_free == 5
    alloc.free(np.array([got[1], got[1]], dtype=np.int32))
    with pytest.raises(AssertionError):
        alloc.check_invariants()


# --- radix cache -----------------------------------------------------------------------------

def test_insert_returns_already_cached_len_and_match_copies() -> None:
    alloc, cache = make()
    slots = put(alloc, cache, [1, 2, 3, 4])
    assert cache.insert([1, 2, 3, 4], slots) == 4
    dup = alloc.alloc(2)
    both = np.concatenate([slots[:2], dup])
    assert cache.insert([1, 2, 9, 9], both) == 2
    m = cache.match_prefix([1, 2, 9, 9, 5])
    assert m.slots.tolist() == both.tolist()
    m.slots[:] = 0
    assert cache.match_prefix([1, 2, 9, 9]).slots.tolist() == both.tolist()
    both[:] = 0
    assert cache.match_prefix([1, 2, 9, 9]).slots.tolist() == slots[:2].tolist() + dup.tolist()
    assert cache.total_size == 6
    cache.check_invariants()


def test_match_splits_node_and_peek_does_not() -> None:
    alloc, cache = make()
    slots = put(alloc, cache, [1, 2, 3, 4, 5])
    assert cache.peek_prefix_len([1, 2, 3, 7]) == 3
    assert len(cache.root.children[1].key) == 5
    m = cache.match_prefix([1, 2, 3, 7])
    assert m.slots.tolist() == slots[:3].tolist()
    assert m.node.key.tolist() == [1, 2, 3]
    assert list(m.node.children) == [4]
    assert cache.match_prefix([]).node is cache.root
    assert cache.match_prefix([9]).slots.size == 0
    cache.check_invariants()


def test_lock_protects_from_evict_and_unlock_below_zero_raises() -> None:
    alloc, cache = make()
    put(alloc, cache, [1, 2, 3])
    put(alloc, cache, [4, 5])
    m = cache.match_prefix([1, 2])
    cache.lock(m.node)
    assert cache.protected_size == 2 and cache.evictable_size == 3
    assert cache.evict(100) == 3
    assert cache.match_prefix([1, 2, 3]).slots.size == 2
    assert cache.match_prefix([4, 5]).slots.size == 0
    cache.unlock(m.node)
    with pytest.raises(RuntimeError):
        cache.unlock(m.node)
    assert cache.evict(100) == 2 and cache.total_size == 0
    assert alloc.num_free == alloc.capacity
    with pytest.raises(RuntimeError):
        cache.lock(m.node)
    cache.check_invariants()


def test_evict_lru_order() -> None:
    alloc, cache = make()
    put(alloc, cache, [1, 1])
    b = put(alloc, cache, [2, 2])
    put(alloc, cache, [3, 3])
    cache.match_prefix([1, 1])
    assert cache.evict(1) == 2
    assert set(b.tolist()) <= set(alloc.free_slots().tolist())
    assert cache.peek_prefix_len([2, 2]) == 0
    # A partial match refreshes only the matched part: the unmatched [3] suffix is now the oldest.
    cache.match_prefix([3])
    assert cache.evict(1) == 1
    assert cache.peek_prefix_len([3, 3]) == 1
    assert cache.evict(1) == 2
    assert cache.peek_prefix_len([1, 1]) == 0 and cache.peek_prefix_len([3]) == 1
    cache.check_invariants()


def test_evict_cascades_to_parent() -> None:
    alloc, cache = make()
    put(alloc, cache, [1, 2, 3])
    put(alloc, cache, [1, 2, 4])
    put(alloc, cache, [7])
    cache.match_prefix([7])
    # Leaves [3], [4] go first, then their parent [1, 2] becomes an evictable leaf before [7].
    assert cache.evict(3) == 4
    assert cache.peek_prefix_len([1, 2]) == 0 and cache.peek_prefix_len([7]) == 1
    cache.check_invariants()


def test_reset_frees_everything_unless_locked() -> None:
    alloc, cache = make()
    put(alloc, cache, [1, 2, 3])
    put(alloc, cache, [1, 5])
    m = cache.match_prefix([1, 5])
    cache.lock(m.node)
    with pytest.raises(RuntimeError):
        cache.reset()
    cache.unlock(m.node)
    cache.reset()
    assert alloc.num_free == alloc.capacity and cache.total_size == 0
    assert cache.check_invariants().size == 0


def test_exhaustion_is_never_partial() -> None:
    alloc, cache = make(6)
    put(alloc, cache, [1, 2, 3])
    assert alloc.alloc(3) is None and alloc.num_free == 2
    assert cache.evict(1) == 3
    assert alloc.alloc(5) is not None and alloc.num_free == 0


# --- property-based: random operations against a reference model ------------------------------

NUM_SLOTS = 40
tokens_st = st.lists(st.integers(0, 3), min_size=0, max_size=10)


@dataclass
class Request:
    tokens: list[int]
    node: TreeNode  # locked while the request runs
    cached: int  # slots[:cached] came from the tree; the test owns slots[cached:]
    slots: np.ndarray


class RadixMachine(RuleBasedStateMachine):
    """Drives the cache like the scheduler does, checking it against `ref`: prefix tuple -> slot.

    `ref` maps every cached prefix (tuple of tokens) to the slot of its last token; it is
    prefix-closed. `seen[p]` is the last step whose match or insert covered prefix p. A running
    request holds a lock on its matched node and owns its new slots.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alloc = KVSlotAllocator(NUM_SLOTS)
        self.cache = RadixCache(self.alloc)
        self.ref: dict[tuple[int, ...], int] = {}
        self.seen: dict[tuple[int, ...], int] = {}
        self.step = 0
        self.requests: list[Request] = []

    def ref_match(self, tokens: list[int]) -> list[int]:
        out = []
        for i in range(1, len(tokens) + 1):
            slot = self.ref.get(tuple(tokens[:i]))
            if slot is None:
                break
            out.append(slot)
        return out

    def check_match(self, tokens: list[int]) -> MatchResult:
        expected = self.ref_match(tokens)
        assert self.cache.peek_prefix_len(tokens) == len(expected)
        self.touch(tokens[:len(expected)])
        m = self.cache.match_prefix(tokens)
        assert m.slots.dtype == np.int32 and m.slots.tolist() == expected
        return m

    def touch(self, tokens: list[int]) -> None:
        self.step += 1
        for i in range(1, len(tokens) + 1):
            self.seen[tuple(tokens[:i])] = self.step

    def locked_prefixes(self) -> set[tuple[int, ...]]:
        return {tuple(r.tokens[:i]) for r in self.requests for i in range(1, r.cached + 1)}

    def draw_tokens(self, data: st.DataObject) -> list[int]:
        """Fresh tokens, or a cached prefix plus a few more (so matches cover whole nodes)."""
        if self.ref and data.draw(st.booleans()):
            base = list(data.draw(st.sampled_from(sorted(self.ref))))
            return base + data.draw(st.lists(st.integers(0, 3), max_size=3))
        return data.draw(tokens_st)

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        self.check_match(self.draw_tokens(data))

    def begin(self, tokens: list[int]) -> Request | None:
        """Match, lock and allocate the uncached rest, evicting if short; None if it can't fit."""
        m = self.check_match(tokens)
        self.cache.lock(m.node)
        need = len(tokens) - len(m.slots)
        new = self.alloc.alloc(need)
        if new is None:
            self.evict_and_check(need - self.alloc.num_free)
            new = self.alloc.alloc(need)
        if new is None:
            self.cache.unlock(m.node)
            return None
        return Request(tokens, m.node, len(m.slots), np.concatenate([m.slots, new]))

    def finish(self, req: Request) -> None:
        """Insert the request's sequence, free the slots the tree already had, unlock."""
        expected_already = len(self.ref_match(req.tokens))
        already = self.cache.insert(req.tokens, req.slots)
        assert already == expected_already and already >= req.cached
        self.alloc.free(req.slots[req.cached:already])
        for i in range(already, len(req.tokens)):
            self.ref[tuple(req.tokens[:i + 1])] = int(req.slots[i])
        self.touch(req.tokens)
        self.cache.unlock(req.node)

    def pop_request(self, data: st.DataObject) -> Request:
        return self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))

    @initialize(seqs=st.lists(tokens_st, max_size=8))
    def populate(self, seqs: list[list[int]]) -> None:
        for tokens in seqs:
            req = self.begin(tokens)
            if req is not None:
                self.finish(req)

    @rule(data=st.data())
    def start_request(self, data: st.DataObject) -> None:
        req = self.begin(self.draw_tokens(data))
        if req is not None:
            self.requests.append(req)

    @rule(data=st.data())
    def run_request(self, data: st.DataObject) -> None:
        req = self.begin(self.draw_tokens(data))
        if req is not None:
            self.finish(req)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish_request(self, data: st.DataObject) -> None:
        self.finish(self.pop_request(data))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def abort_request(self, data: st.DataObject) -> None:
        req = self.pop_request(data)
        self.alloc.free(req.slots[req.cached:])
        self.cache.unlock(req.node)

    @rule(n=st.integers(0, 8))
    def evict(self, n: int) -> None:
        self.evict_and_check(n)

    def evict_and_check(self, n: int) -> None:
        locked = self.locked_prefixes()
        freed = self.cache.evict(n)
        assert freed >= n or self.cache.evictable_size == 0
        kept = set(self.cache.check_invariants().tolist())
        removed = [p for p, s in self.ref.items() if s not in kept]
        assert len(removed) == freed
        assert not locked.intersection(removed), "evicted a locked path"
        for p in removed:
            del self.ref[p]
        assert all(len(p) == 1 or p[:-1] in self.ref for p in self.ref), "ref not prefix-closed"
        # LRU: nothing evicted was used more recently than an evictable leaf that survived.
        inner = {p[:-1] for p in self.ref}
        leaves = [self.seen[p] for p in self.ref if p not in inner and p not in locked]
        if removed and leaves:
            assert max(self.seen[p] for p in removed) <= min(leaves), "eviction not LRU"

    @rule()
    def reset(self) -> None:
        if self.cache.protected_size:
            with pytest.raises(RuntimeError):
                self.cache.reset()
        else:
            self.cache.reset()
            self.ref.clear()

    @invariant()
    def consistent(self) -> None:
        tree = self.cache.check_invariants()
        self.alloc.check_invariants()
        assert sorted(tree.tolist()) == sorted(self.ref.values())
        assert self.cache.total_size == len(self.ref)
        assert self.cache.protected_size == len(self.locked_prefixes())
        held = [r.slots[r.cached:] for r in self.requests]
        everything = np.concatenate([self.alloc.free_slots(), tree, *held])
        assert sorted(everything.tolist()) == list(range(1, NUM_SLOTS)), "slots not a partition"


RadixMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_radix_machine = RadixMachine.TestCase
