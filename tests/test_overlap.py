"""Overlap scheduling in the scheduler: step N+1 is built and sent before step N's tokens are back.

A stand-in worker mirrors what the real one does: it keeps the token each req slot sampled last and
substitutes it for a -1 input id, and its next token is a function of the input token and its position,
so a wrong substitution changes every later token. The loop drives the scheduler as
scheduler_proc/main.py does with and without overlap.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve import wire
from radixserve.config import ServerArgs
from scheduler_proc.scheduler import Scheduler

EOS = 2


class StandInWorker:
    """Runs each StepBatch at once, in order, like the device; answers are collected by the loop."""

    def __init__(self, eos_every: int = 0) -> None:
        self.last_sampled: dict[int, int] = {}
        self.results: deque[wire.StepResult] = deque()
        self.placeholders = 0
        self.eos_every = eos_every

    def launch(self, batch: wire.StepBatch) -> None:
        slots, ids = wire.from_i32(batch.req_slots), wire.from_i32(batch.input_ids).copy()
        cached, extend = wire.from_i32(batch.cached_lens), wire.from_i32(batch.extend_lens)
        rows = np.repeat(slots, extend)
        for t in np.flatnonzero(ids < 0):
            self.placeholders += 1
            assert int(rows[t]) in self.last_sampled, "a placeholder for a slot that never sampled"
            ids[t] = self.last_sampled[int(rows[t])]
        last = np.cumsum(extend) - 1
        positions = cached + extend - 1
        tokens = [self._next(int(ids[j]), int(p)) for j, p in zip(last, positions)]
        for slot, tok in zip(slots.tolist(), tokens):
            self.last_sampled[slot] = tok
        self.results.append(wire.StepResult(step=batch.step, next_ids=wire.i32(tokens),
                                            next_logprobs=np.zeros(len(tokens), np.float32).tobytes()))

    def _next(self, token: int, position: int) -> int:
        value = (token * 31 + position * 7) % 97
        if self.eos_every and value % self.eos_every == 0:
            return EOS
        return 3 + value


def drive(s: Scheduler, worker: StandInWorker, overlap: bool, aborts: dict[int, list[str]] | None = None,
          max_iters: int = 20_000) -> dict[str, list[wire.ReqOut]]:
    """The scheduler process's loop (scheduler_proc/main.py) over the stand-in; outputs by request id."""
    outs: dict[str, list[wire.ReqOut]] = defaultdict(list)

    def record(routed: list) -> None:
        for _, out in routed:
            assert not outs[out.rid] or outs[out.rid][-1].finish is None, f"{out.rid} got output after its finish"
            outs[out.rid].append(out)

    for it in range(max_iters):
        for rid in (aborts or {}).get(it, []):
            routed = s.abort(rid)
            if routed is not None:
                record([routed])
        batch = s.schedule()
        record(s.pending_outs)
        s.pending_outs = []
        if batch is not None:
            worker.launch(batch)
        if len(s.inflight) > (1 if overlap and batch is not None else 0):
            record(s.process_result(worker.results.popleft()))
        if batch is None and not s.inflight and not s.has_work:
            return outs
    raise AssertionError("the scheduler did not go idle")


def _workload(n: int, seed: int) -> list[wire.GenerateTokens]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 90) for _ in range(40)]
    reqs = []
    for i in range(n):
        prompt = (shared[:rng.randrange(0, 40)] if rng.random() < 0.6 else []) + \
            [rng.randrange(3, 90) for _ in range(rng.randrange(1, 60))]
        reqs.append(wire.GenerateTokens(rid=f"r{i}", input_ids=prompt, eos_token_ids=[EOS],
                                        sampling=wire.SamplingParams(max_new_tokens=rng.randrange(0, 30),
                                                                     min_new_tokens=rng.choice([0, 0, 3]))))
    return reqs


def _scheduler(pool: int, chunk: int = 32, **kw) -> Scheduler:
    args = ServerArgs(max_running_requests=8, chunked_prefill_size=chunk, new_token_ratio=0.1, **kw)
    return Scheduler(args, num_kv_slots=pool, context_length=256)


def _tokens(outs: dict[str, list[wire.ReqOut]]) -> dict[str, tuple[list[int], str]]:
    return {rid: ([t for o in seq for t in o.new_ids], seq[-1].finish.type) for rid, seq in outs.items()}


@pytest.mark.parametrize(("pool", "radix"), [(4000, True), (4000, False), (300, True)])  # 300: retraction
def test_overlap_gives_the_same_tokens(pool: int, radix: bool) -> None:
    results = {}
    for overlap in (False, True):
        s = _scheduler(pool, disable_radix_cache=not radix)
        for req in _workload(40, seed=1):
            s.add_request(req)
        worker = StandInWorker(eos_every=13)
        outs = drive(s, worker, overlap)
        assert (worker.placeholders > 0) == overlap  # decode inputs still in flight travel as -1
        assert s.counters.retracted_requests > 0 or pool > 300
        s.check_invariants()
        assert s.allocator.num_free + s.cache.evictable_size == s.allocator.capacity
        results[overlap] = _tokens(outs)
        assert all(seq[-1].completion_tokens == len(results[overlap][rid][0]) for rid, seq in outs.items())
    assert results[True] == results[False]
    assert any(kind == "stop" for _, kind in results[True].values())  # EOS reached inside the overlap window


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(60, 600), st.integers(4, 64), st.data())
def test_random_traffic_with_overlap_keeps_invariants(seed, pool, chunk, data) -> None:
    s = _scheduler(pool, chunk)
    reqs = _workload(12, seed)
    for req in reqs:
        if len(req.input_ids) + req.sampling.max_new_tokens < pool - 2:
            s.add_request(req)
    aborts: dict[int, list[str]] = defaultdict(list)
    for req in reqs:
        if data.draw(st.booleans(), label="abort"):
            aborts[data.draw(st.integers(0, 40), label="at")].append(req.rid)
    drive(s, StandInWorker(eos_every=11), overlap=True, aborts=aborts)
    s.check_invariants()
    assert not s.running and not s.waiting and not s.reqs
    assert s.allocator.num_free + s.cache.evictable_size == s.allocator.capacity


def test_a_thousand_random_aborts_leak_no_kv() -> None:
    rng = random.Random(7)
    s = _scheduler(1200, chunk=48)
    worker = StandInWorker(eos_every=0)
    reqs = _workload(1000, seed=3)
    aborts: dict[int, list[str]] = defaultdict(list)
    for i, req in enumerate(reqs):
        s.add_request(req) if i < 200 else None
        aborts[rng.randrange(0, 400)].append(req.rid)
    outs = drive(s, worker, overlap=True, aborts=aborts)
    for req in reqs[200:]:  # a second wave arrives while the first is being aborted
        s.add_request(req)
    outs2 = drive(s, worker, overlap=True, aborts={i: [r.rid for r in reqs[200 + 4 * i: 204 + 4 * i]]
                                                   for i in range(200)})
    s.check_invariants()
    assert not s.running and not s.waiting and not s.reqs
    assert s.allocator.num_free + s.cache.evictable_size == s.allocator.capacity
    finished = {rid: seq[-1].finish.type for rid, seq in (outs | outs2).items()}
    assert len(finished) == 1000 and sum(kind == "abort" for kind in finished.values()) > 500
