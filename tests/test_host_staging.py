"""worker_proc/step_io.py's pinned upload ring (HostStaging), its bookkeeping driven on the CPU with stand-in
copy events: a stretch of the ring is handed out again only after the copies from what was staged there were
waited for, and nothing else is waited for but the tail a wrap skips."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_proc.step_io import HostStaging

CAPACITY = 64


class Copy:
    """A stand-in for a copy's CUDA event: `synchronize` is the host waiting for it."""

    def __init__(self, waited: list[tuple[int, int]], stretch: tuple[int, int]) -> None:
        self.waited, self.stretch = waited, stretch

    def synchronize(self) -> None:
        self.waited.append(self.stretch)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, CAPACITY), min_size=1, max_size=40))
def test_the_ring_waits_for_exactly_the_copies_in_the_way(sizes: list[int]) -> None:
    ring = HostStaging(torch.device("cpu"), CAPACITY)
    waited: list[tuple[int, int]] = []
    for n in sizes:
        before, next_ = list(ring._in_use), ring._next
        start = ring._claim(n)
        end = start + n
        assert 0 <= start and end <= CAPACITY and start in (0, next_)
        wrapped = start != next_
        still = list(ring._in_use)
        assert not any(first < end and start < last for first, last, _ in still), "a copy in the way is left"
        gone = before[:len(before) - len(still)]
        assert before[len(gone):] == still  # the oldest go first
        for first, last, _ in gone:  # each waited for: in the way, or in the tail that a wrap skips
            assert (first < end and start < last) or (wrapped and first >= next_), (first, last, start, end)
        ring._in_use.append((start, end, Copy(waited, (start, end))))
