"""The waiting queue and the running set: ordered, with O(1) insertion and removal of any request.

Both key insertion-ordered dicts on the request object itself (Req hashes by identity), so leaving a
queue costs a hash lookup, not a scan comparing requests field by field.
"""

from __future__ import annotations

from collections.abc import Iterator

from scheduler_proc.request import Req, Stage


class WaitingQueue:
    """Requests not admitted yet, in service order: retracted ones first (the latest retracted at the
    front), then arrivals in arrival order — what a deque gives with appendleft / append.

    Invariant: every request in it is in Stage.WAITING.
    """

    def __init__(self) -> None:
        self._front: dict[Req, None] = {}  # pushed to the front; the last pushed is served first
        self._back: dict[Req, None] = {}  # arrivals, in arrival order

    def push_back(self, req: Req) -> None:
        req.stage = Stage.WAITING
        self._back[req] = None

    def push_front(self, req: Req) -> None:
        req.stage = Stage.WAITING
        self._front[req] = None

    def remove(self, req: Req) -> None:
        if req in self._front:
            del self._front[req]
        else:
            del self._back[req]

    def __iter__(self) -> Iterator[Req]:
        yield from reversed(self._front)
        yield from self._back

    def __len__(self) -> int:
        return len(self._front) + len(self._back)

    def __bool__(self) -> bool:
        return bool(self._front or self._back)

    def check_invariants(self) -> None:
        assert not self._front.keys() & self._back.keys(), "a request is queued twice"
        assert all(r.stage == Stage.WAITING for r in self), "a queued request is not waiting"


class RunningSet:
    """Admitted requests in admission order, and among them those still prefilling (Stage.PREFILL), so a
    step finds the chunked prefills to continue without scanning every running request.

    Invariant: `prefilling` holds exactly the running requests in Stage.PREFILL, in admission order; the
    others are in Stage.DECODE.
    """

    def __init__(self) -> None:
        self._reqs: dict[Req, None] = {}
        self.prefilling: dict[Req, None] = {}

    def add(self, req: Req) -> None:
        """Admit `req`: it starts prefilling."""
        req.stage = Stage.PREFILL
        self._reqs[req] = None
        self.prefilling[req] = None

    def prefilled(self, req: Req) -> None:
        """`req` has KV for its whole prompt: it decodes from now on."""
        req.stage = Stage.DECODE
        del self.prefilling[req]

    def remove(self, req: Req) -> None:
        del self._reqs[req]
        self.prefilling.pop(req, None)

    def __iter__(self) -> Iterator[Req]:
        return iter(self._reqs)

    def __len__(self) -> int:
        return len(self._reqs)

    def __bool__(self) -> bool:
        return bool(self._reqs)

    def check_invariants(self) -> None:
        assert list(self.prefilling) == [r for r in self._reqs if r.stage == Stage.PREFILL], "prefilling set is stale"
        assert all(r.stage in (Stage.PREFILL, Stage.DECODE) for r in self._reqs), "a running request is not running"
