"""Overlap scheduling in the scheduler: step N+1 is built and sent before step N's tokens are back.

A stand-in worker mirrors what the real one does: it keeps the token each req slot sampled last and
substitutes it for a -1 input id, and its next token is a function of the input token and its position,
so a wrong substitution changes every later token. The loop drives the scheduler as
scheduler_proc/main.py does with and without overlap.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Callable

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve import wire
from radixserve.config import ServerArgs
from scheduler_proc.control import handle_control
from scheduler_proc.lifecycle import Outcome
from scheduler_proc.request import Stage
from scheduler_proc.scheduler import Scheduler

EOS = 2
BAD_REGEX = "(unclosed"  # the stand-in's compile of it fails
NO_ADMIT_SEED = 666  # the stand-in cannot admit a request with this seed (StepResult.admit_errors)


class StandInWorker:
    """Runs each StepBatch at once, in order, like the device; answers are collected by the loop."""

    def __init__(self, eos_every: int = 0) -> None:
        self.last_sampled: dict[int, int] = {}
        self.results: deque[wire.StepResult] = deque()
        self.placeholders = 0
        self.eos_every = eos_every
        self.compiling: list[wire.CompileGrammar] = []  # answered with the next step, as a compile takes time
        # The host tier's loads: each one's device slots until a step waits for it; those reported done with the
        # next step's answer (a step of no requests waits for its own).
        self.landing: dict[int, set[int]] = {}
        self.copying: list[int] = []

    def launch(self, batch: wire.StepBatch) -> None:
        for load in wire.from_i32(batch.load_waits).tolist():
            del self.landing[load]  # a KeyError: waited for twice, or never started
        landing = set().union(*self.landing.values())
        touched = [wire.from_i32(batch.out_slots)] + [wire.from_i32(nr.prefix_slots) for nr in batch.new_reqs] + \
            [wire.from_i32(m.src if m.to_host else m.dst) for m in batch.kv_moves]
        assert not landing & set(np.concatenate(touched).tolist()), "a step reads or reuses slots of a load in flight"
        loads = {m.load: set(wire.from_i32(m.dst).tolist()) for m in batch.kv_moves if not m.to_host}
        self.landing.update(loads)
        loads_done = self.copying + ([] if batch.req_slots else list(loads))
        self.copying = list(loads) if batch.req_slots else []
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
        done = [wire.GrammarDone(job.gid, "invalid regex" if job.grammar.source == BAD_REGEX else None)
                for job in self.compiling]
        self.compiling = list(batch.grammars)
        cannot_admit = [(nr.req_slot, "cannot admit it") for nr in batch.new_reqs if nr.seed == NO_ADMIT_SEED]
        self.results.append(wire.StepResult(step=batch.step, next_ids=wire.i32(tokens),
                                            next_logprobs=np.zeros(len(tokens), np.float32).tobytes(),
                                            grammars_done=done, admit_errors=cannot_admit,
                                            loads_done=wire.i32(loads_done)))

    def _next(self, token: int, position: int) -> int:
        value = (token * 31 + position * 7) % 97
        if self.eos_every and value % self.eos_every == 0:
            return EOS
        return 3 + value


class Record:
    """What the front ends received, by request id, checked as it arrives: nothing after a request's end."""

    def __init__(self) -> None:
        self.outs: dict[str, list[wire.ReqOut]] = defaultdict(list)
        self.rejected: dict[str, wire.Rejected] = {}

    def ended(self, rid: str) -> bool:
        return rid in self.rejected or bool(self.outs.get(rid)) and self.outs[rid][-1].finish is not None

    def take(self, outcome: Outcome | None) -> None:
        if outcome is None:
            return
        for _, out in outcome.outs:
            assert not self.ended(out.rid), f"{out.rid} got output after its end"
            self.outs[out.rid].append(out)
        for _, reply in outcome.replies:
            if isinstance(reply, wire.Rejected):
                assert not self.ended(reply.rid), f"{reply.rid} rejected after its end"
                self.rejected[reply.rid] = reply

    def received(self, rid: str) -> int:
        """Output tokens received so far."""
        return sum(len(o.new_ids) for o in self.outs.get(rid, []))


Event = Callable[[Scheduler, Record], "Outcome | None"]
SHUTDOWN: Event = lambda s, rec: s.shutdown()  # noqa: E731 (drive stops after it)


def aborting(at: dict[int, list[str]]) -> dict[int, list[Event]]:
    """Events that abort each rid at its iteration."""
    return {it: [lambda s, rec, rid=rid: s.abort(rid) for rid in rids] for it, rids in at.items()}


def drive(s: Scheduler, worker: StandInWorker, overlap: bool, events: dict[int, list[Event]] | None = None,
          max_iters: int = 20_000) -> Record:
    """The scheduler process's loop (scheduler_proc/main.py) over the stand-in, with `events` (messages from the
    front ends) at their iterations; what the front ends received. After SHUTDOWN the steps in flight are
    answered (as the workers would) and the loop returns."""
    rec = Record()
    last_event = max(events or {0: []})
    for it in range(max_iters):
        for event in (events or {}).get(it, []):
            rec.take(event(s, rec))
            if event is SHUTDOWN:
                while s.inflight:
                    rec.take(s.process_result(worker.results.popleft()))
                return rec
        step = s.schedule()
        rec.take(step)
        if step.batch is not None:
            worker.launch(step.batch)
        if len(s.inflight) > (1 if overlap and step.batch is not None else 0):
            rec.take(s.process_result(worker.results.popleft()))
        if step.batch is None and not s.inflight and not s.has_work and it >= last_event:
            return rec
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


def _scheduler(pool: int, chunk: int = 32, host: int = 0, **kw) -> Scheduler:
    """`host`: the host tier's slots (--enable-hierarchical-cache), 0 for none."""
    args = ServerArgs(max_running_requests=8, chunked_prefill_size=chunk, new_token_ratio=0.1,
                      enable_hierarchical_cache=host > 0, **kw)
    return Scheduler(args, num_kv_slots=pool, context_length=256, num_host_kv_slots=host)


def _tokens(outs: dict[str, list[wire.ReqOut]]) -> dict[str, tuple[list[int], str]]:
    return {rid: ([t for o in seq for t in o.new_ids], seq[-1].finish.type) for rid, seq in outs.items()}


@pytest.mark.parametrize(("pool", "radix", "host", "policy"), [
    (4000, True, 0, "write_back"), (4000, False, 0, "write_back"), (300, True, 0, "write_back"),
    (300, True, 900, "write_back"), (300, True, 900, "write_through"), (300, True, 900, "write_through_selective"),
])  # 300: retraction; 900: the host tier
def test_overlap_gives_the_same_tokens(pool: int, radix: bool, host: int, policy: str) -> None:
    results = {}
    for overlap in (False, True):
        s = _scheduler(pool, host=host, disable_radix_cache=not radix, hicache_write_policy=policy)
        for req in _workload(40, seed=1):
            s.add_request(req)
        worker = StandInWorker(eos_every=13)
        outs = drive(s, worker, overlap).outs
        assert (worker.placeholders > 0) == overlap  # decode inputs still in flight travel as -1
        assert s.counters.retracted_requests > 0 or pool > 300
        if host:  # prompts found in the host tier came back (selective: only a reused prefix goes there)
            moved = s.cache.host.stored_tokens if policy == "write_through_selective" else s.cache.host.loaded_tokens
            assert moved > 0
        s.check_invariants()
        assert s.allocator.num_free + s.cache.evictable_size == s.allocator.capacity
        results[overlap] = _tokens(outs)
        assert all(seq[-1].completion_tokens == len(results[overlap][rid][0]) for rid, seq in outs.items())
    assert results[True] == results[False]
    assert any(kind == "stop" for _, kind in results[True].values())  # EOS reached inside the overlap window


@pytest.mark.parametrize("overlap", [False, True])
def test_outputs_go_out_every_report_interval_with_the_same_tokens(overlap: bool) -> None:
    """A request's front end gets its first output at once, then a message per `report_interval` output tokens,
    and the rest with its last: the same tokens and counts as a message per step, through retraction, EOS inside
    the overlap window and aborts of requests whose latest tokens were not sent yet."""
    got = {}
    for interval in (1, 4, 50):
        s = _scheduler(300)
        rids = []
        for req in _workload(40, seed=3):
            s.add_request(msgspec.structs.replace(req, report_interval=interval))
            rids.append(req.rid)
        aborts = {12 + 3 * i: [f"r{i}"] for i in range(8)}
        rec = drive(s, StandInWorker(eos_every=13), overlap, aborting(aborts))
        check_one_end_each(s, rec, rids, set())
        assert s.counters.retracted_requests > 0
        for rid, seq in rec.outs.items():
            sizes = [len(o.new_ids) for o in seq]
            assert sizes[0] <= 1 and all(n == interval for n in sizes[1:-1]) and sizes[-1] <= interval, (rid, sizes)
        aborted = [rec.outs[rid][-1] for rids in aborts.values() for rid in rids]
        assert any(o.finish.type == "abort" and len(o.new_ids) > 1 for o in aborted) == (interval > 1)
        got[interval] = _tokens(rec.outs)
    assert got[4] == got[1] == got[50]


def test_a_stop_string_cuts_outputs_not_sent_yet() -> None:
    """Tokens sampled after where the front end's stop string ended the output never reach it, sent or not."""
    s = _scheduler(300)
    s.add_request(wire.GenerateTokens(rid="r", input_ids=list(range(3, 13)), eos_token_ids=[EOS], report_interval=4,
                                      sampling=wire.SamplingParams(max_new_tokens=30, ignore_eos=True)))
    worker, rec = StandInWorker(), Record()
    while sum(len(o.new_ids) for o in rec.outs["r"]) < 5 or s.lifecycle.reqs["r"].num_outputs < 7:
        step = s.schedule()
        worker.launch(step.batch)
        rec.take(s.process_result(worker.results.popleft()))
    assert [len(o.new_ids) for o in rec.outs["r"]] == [1, 4] and s.lifecycle.reqs["r"].num_outputs == 7
    rec.take(s.abort("r", wire.FinishReason(type="stop", matched="STOP", length=6)))
    final = rec.outs["r"][-1]
    assert final.new_ids == [_tokens(rec.outs)["r"][0][5]] and final.completion_tokens == 6
    s.check_invariants()


RUNTIME = wire.RuntimeInfo(num_kv_slots=0, context_length=256, vocab_size=1 << 31, device="cpu", dtype="float32",
                           attention_backend="torch", kv_bytes_per_token=0, weight_bytes=0)


def control(call: wire.ControlCall) -> Event:
    """An event: a control call that must succeed."""
    def event(s: Scheduler, rec: Record) -> Outcome:
        outcome = handle_control(s, RUNTIME, call)
        ((_, reply),) = outcome.replies
        assert reply.ok, reply.error
        return outcome
    return event


def submitting(msg: wire.GenerateTokens, arrived: list[str], refused: set[str]) -> Event:
    """An event: the request arrives (its rid goes to `arrived`, and to `refused` if it is rejected at once)."""
    def event(s: Scheduler, rec: Record) -> Outcome:
        arrived.append(msg.rid)
        outcome = s.submit(msg)
        if outcome.replies:
            refused.add(msg.rid)
        return outcome
    return event


def stop_string(rid: str, back: int) -> Event:
    """An event: the tokenizer matched a stop string `back` tokens before the end of what it received."""
    def event(s: Scheduler, rec: Record) -> Outcome:
        return s.abort(rid, wire.FinishReason(type="stop", matched="STOP", length=max(rec.received(rid) - back, 0)))
    return event


def check_one_end_each(s: Scheduler, rec: Record, rids: list[str], refused: set[str], ends_before: int = 0) -> None:
    """The one-path invariant after a run: every request answered by exactly one final message, every one the
    scheduler took and ended with a token message (not a rejection) counted by exactly one end (`ends_before`
    counted before the run), nothing left, the state's invariants whole."""
    for rid in rids:
        finals = (rid in rec.rejected) + sum(o.finish is not None for o in rec.outs.get(rid, []))
        assert finals == 1, f"{rid}: {finals} final messages"
    rejected_later = set(rec.rejected) - refused
    assert s.counters.finished_requests + s.counters.aborted_requests - ends_before == (
        len(rids) - len(refused) - len(rejected_later))
    for seq in rec.outs.values():
        final, received = seq[-1], sum(len(o.new_ids) for o in seq)
        if final.finish.matched == "STOP":  # the output ends where the stop string did
            assert final.completion_tokens == final.finish.length <= received
        else:
            assert final.completion_tokens == received
    s.check_invariants()
    assert not s.running and not s.waiting and not s.lifecycle.reqs and not len(s.grammars)


def check_no_kv_held(s: Scheduler) -> None:
    """0 leaked slots: with every session closed, each KV slot is free or evictable."""
    for sid in list(s.sessions.sessions):
        control(wire.CloseSession(call_id="close", session_id=sid))(s, Record())
    s.check_invariants()  # with the host tier: its slots are free or in exactly one host-resident node
    assert s.sessions.pinned_tokens == 0
    assert s.allocator.num_free + s.cache.evictable_size == s.allocator.capacity
    if s.cache.host is not None:
        assert s.cache.host.allocator.num_free + s.cache.host.size == s.cache.host.allocator.capacity


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize(("prompt", "new_tokens"), [(40, 30), (68, 2)])
def test_session_pins_give_way_to_a_request_that_needs_their_kv(overlap, prompt, new_tokens) -> None:
    """A session's finished turn pins 24 of the pool's 77 tokens; then a request alone needs 70 to finish, or a
    prompt of 68 (prefilled in chunks of 8) does. Each runs to its max_new_tokens: the pin is dropped rather than
    the request ended early or stalled for good."""
    s = _scheduler(78, chunk=8, session_kv_budget=40)
    never_eos = wire.SamplingParams(max_new_tokens=15, min_new_tokens=15)
    drive(s, StandInWorker(), overlap, {0: [
        control(wire.OpenSession(call_id="open", session_id="s0")),
        lambda s, rec: s.submit(wire.GenerateTokens(rid="turn", input_ids=list(range(3, 13)), eos_token_ids=[EOS],
                                                    session=wire.SessionParams(id="s0"), sampling=never_eos))]})
    assert s.sessions.pinned_tokens == 24  # the turn's prompt and output, less its last token (never computed)
    sp = wire.SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    rec = drive(s, StandInWorker(), overlap, {0: [lambda s, rec: s.submit(wire.GenerateTokens(
        rid="r", input_ids=[20 + i % 50 for i in range(prompt)], eos_token_ids=[EOS], sampling=sp))]})
    ids, finish = _tokens(rec.outs)["r"]
    assert (len(ids), finish) == (new_tokens, "length")
    assert s.sessions.pinned_tokens == 0 and s.counters.retracted_requests == 0
    s.check_invariants()


@pytest.mark.parametrize(("overlap", "policy"), [(False, None), (True, None), (True, "write_back"),
                                                (True, "write_through"), (True, "write_through_selective")])
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(60, 600), st.integers(4, 64), st.data())
def test_random_traffic_ends_every_request_once(overlap, policy, seed, pool, chunk, data) -> None:
    """Random traffic that ends requests every way there is — EOS, max_new_tokens, the context, a stop string
    (an Abort with a finish), an abort, a disconnect, an invalid grammar, the workers unable to admit, alone and
    out of KV (prompts near the pool's size), the server shutting down — with sessions closed (and reopened
    under the same id) while their turns run, and retraction in small pools. Checked after each run: one final
    message and one end per request (a second end is an AssertionError in Lifecycle.end), and 0 leaked slots,
    without the host tier (`policy` None) and with it under each write policy, a flush tried at a random moment
    (refused while requests run) and one at the end that empties both pools."""
    def draw(strategy, label: str):
        return data.draw(strategy, label=label)

    s = _scheduler(pool, chunk, host=2 * pool if policy else 0, session_kv_budget=pool // 3,
                   hicache_write_policy=policy or "write_back")
    events: dict[int, list[Event]] = defaultdict(list)
    events[draw(st.integers(0, 80), "flush at")].append(
        lambda s, rec: handle_control(s, RUNTIME, wire.FlushCache(call_id="flush")))
    rids: list[str] = []
    refused: set[str] = set()

    def arrive(at: int, msg: wire.GenerateTokens) -> None:
        events[at].append(submitting(msg, rids, refused))

    for sid in ("s0", "s1"):
        events[0].append(control(wire.OpenSession(call_id=sid, session_id=sid)))
        closed = draw(st.integers(0, 60) | st.none(), f"close {sid} at")
        if closed is not None:
            events[closed].append(control(wire.CloseSession(call_id=sid, session_id=sid)))
            if draw(st.booleans(), f"reopen {sid}"):
                events[closed + 1 + draw(st.integers(0, 10), "later")].append(
                    control(wire.OpenSession(call_id=sid, session_id=sid)))
    for req in _workload(12, seed):
        kind = draw(st.sampled_from(["plain", "plain", "regex", "bad regex", "no admit", "turn"]), "kind")
        sp = req.sampling
        if kind in ("regex", "bad regex"):
            sp = msgspec.structs.replace(sp, regex="[a-z]+" if kind == "regex" else BAD_REGEX)
        elif kind == "no admit":
            sp = msgspec.structs.replace(sp, seed=NO_ADMIT_SEED)
        session = wire.SessionParams(id=draw(st.sampled_from(["s0", "s1"]), "session")) if kind == "turn" else None
        arrive(0, msgspec.structs.replace(req, sampling=sp, session=session))
        if session is not None and draw(st.booleans(), "next turn"):  # continues this one (or is refused)
            arrive(draw(st.integers(1, 60), "next turn at"),
                   wire.GenerateTokens(rid=req.rid + "+", input_ids=[5, 6], eos_token_ids=[EOS],
                                       session=wire.SessionParams(id=session.id, rid=req.rid), sampling=sp))
        end = draw(st.sampled_from([None, None, "abort", "disconnect", "stop string"]), "ended by")
        at = draw(st.integers(0, 60), "at")
        if end == "abort":
            events[at].append(lambda s, rec, rid=req.rid: s.abort(rid))
        elif end == "disconnect":  # the tokenizer's Abort when the client went away
            events[at].append(lambda s, rec, rid=req.rid: s.abort(
                rid, wire.FinishReason(type="abort", message="the client disconnected")))
        elif end == "stop string":
            events[at].append(stop_string(req.rid, draw(st.integers(0, 3), "back")))
    if draw(st.booleans(), "shutdown"):
        events[draw(st.integers(0, 80), "shutdown at")].append(SHUTDOWN)
    rec = drive(s, StandInWorker(eos_every=11), overlap, events)
    check_one_end_each(s, rec, rids, refused)
    check_no_kv_held(s)
    control(wire.FlushCache(call_id="flush"))(s, rec)
    s.check_invariants()
    assert s.allocator.num_free == s.allocator.capacity
    assert s.cache.host is None or s.cache.host.allocator.num_free == s.cache.host.allocator.capacity


@pytest.mark.parametrize("overlap", [False, True])
def test_every_way_of_ending_goes_through_the_one_end(overlap: bool) -> None:
    """Each way of ending once, by name, in one run (then a shutdown in a second): what each request's final
    message says, one end each, 0 leaked slots; a session closed (and reopened) while its turn runs, and a
    request retracted on the way."""
    s = _scheduler(100, chunk=32, session_kv_budget=30)
    rids: list[str] = []
    refused: set[str] = set()

    def req(rid: str, n: int = 8, max_new: int = 30, **sampling) -> wire.GenerateTokens:
        sp = wire.SamplingParams(max_new_tokens=max_new, **{"ignore_eos": True, **sampling})
        start = 10 + 3 * len(arrivals)
        return wire.GenerateTokens(rid=rid, input_ids=list(range(start, start + n)), eos_token_ids=[EOS], sampling=sp)

    arrivals: list[wire.GenerateTokens] = []
    for args in [("eos", 8, 30, {"ignore_eos": False}), ("length", 8, 3, {}), ("stop string", 8, 30, {}),
                 ("abort", 8, 30, {}), ("disconnect", 8, 30, {}), ("bad grammar", 8, 30, {"regex": BAD_REGEX}),
                 ("no admit", 8, 30, {"seed": NO_ADMIT_SEED}), ("turn", 8, 12, {}), ("long", 20, 60, {}),
                 ("long 2", 20, 60, {}), ("alone", 60, 150, {})]:
        arrivals.append(req(args[0], args[1], args[2], **args[3]))
    arrivals[7] = msgspec.structs.replace(arrivals[7], session=wire.SessionParams(id="s0"))
    events: dict[int, list[Event]] = defaultdict(list)
    events[0] = [control(wire.OpenSession(call_id="open", session_id="s0"))]
    events[0] += [submitting(msg, rids, refused) for msg in arrivals]
    events[3] = [lambda s, rec: s.abort("abort"), control(wire.CloseSession(call_id="close", session_id="s0"))]
    events[4] = [control(wire.OpenSession(call_id="reopen", session_id="s0"))]
    events[5] = [lambda s, rec: s.abort("disconnect", wire.FinishReason(type="abort", message="disconnected"))]
    events[8] = [stop_string("stop string", back=1)]
    rec = drive(s, StandInWorker(eos_every=5), overlap, events)
    check_one_end_each(s, rec, rids, refused)
    finals = {rid: seq[-1].finish for rid, seq in rec.outs.items()}
    assert {rid: (r.status, r.message) for rid, r in rec.rejected.items()} == {
        "bad grammar": (400, "invalid regex"), "no admit": (400, "cannot admit it")}
    assert finals["eos"].type == "stop" and finals["eos"].matched == EOS
    assert finals["length"] == wire.FinishReason(type="length", length=3)
    assert finals["stop string"].matched == "STOP" and rec.outs["stop string"][-1].completion_tokens >= 1
    assert finals["abort"] == wire.FinishReason(type="abort", message="aborted")
    assert finals["disconnect"] == wire.FinishReason(type="abort", message="disconnected")
    assert finals["turn"] == wire.FinishReason(type="length", length=12)  # its session closed meanwhile
    assert finals["long"] == finals["long 2"] == wire.FinishReason(type="length", length=60)
    assert finals["alone"].type == "length" and finals["alone"].length < 150  # out of KV, alone: it ends there
    assert s.counters.retracted_requests > 0
    assert s.sessions.sessions["s0"].running == 0 and s.sessions.pinned_tokens == 0  # the reopened s0: untouched

    ends_before, late = s.counters.finished_requests + s.counters.aborted_requests, []
    events = {0: [submitting(req(f"late{i}"), late, refused) for i in range(3)], 3: [SHUTDOWN]}
    rec = drive(s, StandInWorker(), overlap, events)
    assert {rid: seq[-1].finish.message for rid, seq in rec.outs.items()} == {
        f"late{i}": "the server is shutting down" for i in range(3)}
    check_one_end_each(s, rec, late, refused, ends_before)
    check_no_kv_held(s)


@pytest.mark.parametrize(("host", "policy"), [(0, "write_back"), (2400, "write_back"), (2400, "write_through"),
                                              (2400, "write_through_selective")])
def test_a_thousand_random_aborts_leak_no_kv(host: int, policy: str) -> None:
    """0 leaked device or host slots after 1,000 random aborts (with the host tier, under each write policy: its
    pool too)."""
    rng = random.Random(7)
    s = _scheduler(1200, chunk=48, host=host, hicache_write_policy=policy)
    worker = StandInWorker(eos_every=0)
    reqs = _workload(1000, seed=3)
    aborts: dict[int, list[str]] = defaultdict(list)
    for i, req in enumerate(reqs):
        s.add_request(req) if i < 200 else None
        aborts[rng.randrange(0, 400)].append(req.rid)
    outs = drive(s, worker, overlap=True, events=aborting(aborts)).outs
    for req in reqs[200:]:  # a second wave arrives while the first is being aborted
        s.add_request(req)
    outs2 = drive(s, worker, overlap=True, events=aborting({i: [r.rid for r in reqs[200 + 4 * i: 204 + 4 * i]]
                                                            for i in range(200)})).outs
    assert not s.running and not s.waiting and not s.lifecycle.reqs
    check_no_kv_held(s)
    assert not host or (s.cache.host.stored_tokens > 0 and s.cache.host.loaded_tokens > 0)
    finished = {rid: seq[-1].finish.type for rid, seq in (outs | outs2).items()}
    assert len(finished) == 1000 and sum(kind == "abort" for kind in finished.values()) > 500


def test_a_load_in_flight_through_an_abort_and_a_flush() -> None:
    """The host tier's load of a request's prefix, reported done a step later by the stand-in (which checks that no
    step reads or reuses its slots before a step waits for it): meanwhile the request waits and the invariant walk
    sees the load's lock on its nodes; an abort of the request leaves them to the load until it is done; a flush while
    a load is in flight cancels it (the next step waits for the copy, the late report is ignored; a load not sent yet
    is dropped). No slot leaks."""
    s, worker, rng = _scheduler(120, chunk=64, host=480), StandInWorker(), random.Random(3)
    prompt = [rng.randrange(3, 90) for _ in range(50)]

    def submit(rid: str, ids: list[int], n: int) -> None:
        s.add_request(wire.GenerateTokens(rid=rid, input_ids=ids, sampling=wire.SamplingParams(max_new_tokens=n)))

    def step() -> wire.StepBatch:
        batch = s.schedule().batch
        worker.launch(batch)
        s.process_result(worker.results.popleft())
        return batch

    def push_prompt_to_host(turn: int) -> None:
        for i in range(2):  # 2 x 52 tokens beside its 52 in a 120-token pool
            submit(f"fill{turn}.{i}", [rng.randrange(3, 90) for _ in range(50)], 2)
        drive(s, worker, overlap=False)

    submit("first", prompt, 2)
    drive(s, worker, overlap=False)
    push_prompt_to_host(1)
    submit("long", [rng.randrange(3, 90) for _ in range(10)], 30)
    step()
    submit("again", prompt, 2)
    carrier = step()
    assert any(not m.to_host for m in carrier.kv_moves) and s.cache.loads_in_flight
    assert s.lifecycle.reqs["again"].stage == Stage.WAITING
    s.check_invariants()  # the loading nodes: on the device, locked by their load
    s.abort("again")
    s.check_invariants()
    assert s.cache.loads_in_flight and s.cache.protected_size >= len(prompt) - 1
    drive(s, worker, overlap=False)
    check_no_kv_held(s)

    push_prompt_to_host(2)
    submit("again2", prompt, 2)
    batch = s.schedule().batch  # a step of no requests that carries the load
    (load,) = [m.load for m in batch.kv_moves if not m.to_host]
    worker.launch(batch)
    assert s.flush_cache()  # nothing runs: the load in flight is cancelled
    assert not s.cache.loads_in_flight and s.allocator.num_free == s.allocator.capacity
    s.process_result(worker.results.popleft())  # reports the cancelled load done: nothing to do
    assert load in wire.from_i32(step().load_waits).tolist()
    drive(s, worker, overlap=False)
    check_no_kv_held(s)

    push_prompt_to_host(3)
    s.cache.match_prefix(prompt)  # a load decided between steps, not sent yet when the flush cancels it
    assert s.cache.loads_in_flight and s.flush_cache()
    submit("after", prompt, 2)
    batch = step()
    assert not any(not m.to_host for m in batch.kv_moves) and not batch.load_waits  # never made, nothing to wait for
    drive(s, worker, overlap=False)
    check_no_kv_held(s)
