"""Scheduler state machine in isolation: a stand-in for the workers answers each step with token ids.

What runs on real processes is covered by test_engine.py; here the point is the KV bookkeeping
under aborts, retraction and chunking, and the size of per-step messages.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve import wire
from radixserve.config import ServerArgs
from scheduler_proc.control import handle_control
from scheduler_proc.lifecycle import Outcome
from scheduler_proc.prefill import ComputingPrompts
from scheduler_proc.queues import RunningSet, WaitingQueue
from scheduler_proc.request import Req, Stage
from scheduler_proc.scheduler import RequestError, Scheduler


def answer(batch: wire.StepBatch, token: int = 7) -> wire.StepResult:
    n = len(wire.from_i32(batch.req_slots))
    return wire.StepResult(step=batch.step, next_ids=wire.i32([token] * n),
                           next_logprobs=np.zeros(n, np.float32).tobytes())


def request(rid: str, ids: list[int], max_new: int = 8, **kw) -> wire.GenerateTokens:
    return wire.GenerateTokens(rid=rid, input_ids=ids, sampling=wire.SamplingParams(max_new_tokens=max_new, **kw),
                               eos_token_ids=[2])


def run_until_idle(s: Scheduler, max_steps: int = 10_000) -> list[wire.ReqOut]:
    outs = []
    for _ in range(max_steps):
        step = s.schedule()
        outs += [o for _, o in step.outs]
        if step.batch is None:
            break
        outs += [o for _, o in s.process_result(answer(step.batch)).outs]
        s.check_invariants()
    return outs


def test_decode_step_message_does_not_grow_with_context():
    args = ServerArgs(max_running_requests=64, chunked_prefill_size=8192, max_prefill_tokens=1 << 20)
    s = Scheduler(args, num_kv_slots=64 * 4200 + 1, context_length=8192)
    for i in range(64):
        s.add_request(request(f"r{i}", list(np.random.default_rng(i).integers(3, 30000, 4096)), max_new=16))
    while any(r.stage.value != "decode" for r in s.running) or s.waiting:
        s.process_result(answer(s.schedule().batch))
    batch = s.schedule().batch
    assert batch.is_decode and len(wire.from_i32(batch.req_slots)) == 64
    size = len(wire.encoder.encode(batch))
    assert size < 8 * 1024, f"a 64-request decode step at 4k context is {size} bytes"


def test_abort_in_every_stage_releases_kv():
    s = Scheduler(ServerArgs(max_running_requests=4, chunked_prefill_size=16), num_kv_slots=200, context_length=512)
    s.add_request(request("waiting-1", list(range(3, 43))))
    s.add_request(request("chunked", list(range(3, 63))))
    s.process_result(answer(s.schedule().batch))  # first chunk of "waiting-1"
    s.check_invariants()
    s.abort("waiting-1")  # mid-prefill
    s.abort("chunked")  # still waiting
    s.check_invariants()
    s.add_request(request("decoding", list(range(3, 13)), max_new=50, ignore_eos=True))
    for _ in range(4):
        s.process_result(answer(s.schedule().batch))
    s.abort("decoding")
    s.check_invariants()
    assert not s.running and not s.waiting
    assert s.allocator.num_free + s.cache.evictable_size == s.allocator.capacity


def test_retraction_when_kv_runs_out_keeps_going():
    s = Scheduler(ServerArgs(max_running_requests=8, new_token_ratio=0.05), num_kv_slots=121, context_length=512)
    for i in range(6):
        s.add_request(request(f"r{i}", list(range(100 * i + 3, 100 * i + 13)), max_new=30, ignore_eos=True))
    outs = run_until_idle(s)
    finished = {o.rid: o for o in outs if o.finish is not None}
    assert set(finished) == {f"r{i}" for i in range(6)}
    assert all(o.finish.type == "length" and o.completion_tokens == 30 for o in finished.values())
    assert s.counters.retracted_requests > 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 60), st.integers(0, 12), st.booleans()),
                min_size=1, max_size=12),
       st.integers(8, 64), st.integers(60, 400), st.data())
def test_invariants_hold_under_random_traffic(reqs, chunk, pool, data):
    s = Scheduler(ServerArgs(max_running_requests=4, chunked_prefill_size=chunk), num_kv_slots=pool,
                  context_length=256)
    for i, (family, length, max_new, _) in enumerate(reqs):
        ids = [3 + family] * 5 + list(range(10 + i, 10 + i + length))
        s.add_request(request(f"r{i}", ids[: max(1, min(length, pool - 2))], max_new=max_new))
    for step in range(400):
        batch = s.schedule().batch
        if batch is None:
            break
        s.process_result(answer(batch, token=data.draw(st.integers(3, 50), label="token")))
        s.check_invariants()
        for i, req in enumerate(reqs):
            if req[3] and step == i:  # abort_later
                s.abort(f"r{i}")
                s.check_invariants()
    assert not s.running and not s.waiting


def test_requests_sharing_a_prefix_compute_it_once():
    s = Scheduler(ServerArgs(max_running_requests=8, chunked_prefill_size=256), num_kv_slots=2000, context_length=1024)
    prefix = list(range(100, 400))
    for i in range(4):  # all arrive together: only the first computes the 300 shared tokens
        s.add_request(request(f"r{i}", prefix + [500 + i, 600 + i], max_new=4))
    outs = run_until_idle(s)
    cached = {o.rid: o.cached_tokens for o in outs if o.finish is not None}
    assert cached["r0"] == 0
    assert all(cached[f"r{i}"] >= 300 for i in range(1, 4))


def test_a_chunked_prompt_is_shared_while_it_is_still_being_computed():
    s = Scheduler(ServerArgs(max_running_requests=8, chunked_prefill_size=64), num_kv_slots=2000, context_length=1024)
    long = list(range(100, 400))
    s.add_request(request("long", long, max_new=2))
    for _ in range(3):  # three chunks of 64 tokens are in the tree now
        s.process_result(answer(s.schedule().batch))
    s.check_invariants()
    assert s.cache.peek_prefix_len(np.asarray(long)) >= 192


def _check_prefix_groups(s: Scheduler, batch: wire.StepBatch) -> np.ndarray:
    """The invariant of scheduler_proc/prefix_groups.py on one decode step; returns its groups."""
    groups = wire.from_i32(batch.prefix_groups).reshape(-1, 2)
    slots, cached = wire.from_i32(batch.req_slots), wire.from_i32(batch.cached_lens)
    assert groups[:, 0].sum() == len(slots) and (groups[:, 0] >= 1).all()
    start = 0
    for size, shared in groups:
        rows = s.table.req_to_token[slots[start:start + size], :shared]
        assert 1 <= shared <= cached[start:start + size].min()
        assert (rows == rows[0]).all(), "a group's requests must share the KV slots of their first shared tokens"
        start += size
    return groups


def test_decode_batches_group_requests_that_share_a_long_prefix():
    from scheduler_proc.prefix_groups import MIN_SAVED_READS

    rng = np.random.default_rng(0)
    shared_len, members = MIN_SAVED_READS // 4 + 100, 5  # (members - 1) * shared_len reads saved per layer
    system = list(rng.integers(3, 30000, shared_len))
    s = Scheduler(ServerArgs(max_running_requests=16), num_kv_slots=40_000, context_length=8192)
    for i in range(members):
        s.add_request(request(f"g{i}", system + list(rng.integers(3, 30000, 5 + 7 * i)), max_new=12, ignore_eos=True))
    for i in range(3):  # unrelated requests: groups of one
        s.add_request(request(f"u{i}", list(rng.integers(3, 30000, 50)), max_new=12, ignore_eos=True))
    grouped_steps = 0
    for _ in range(200):
        batch = s.schedule().batch
        if batch is None:
            break
        if batch.is_decode and batch.prefix_groups:
            groups = _check_prefix_groups(s, batch)
            assert (members, shared_len) in {tuple(g) for g in groups}
            grouped_steps += 1
        else:
            assert not batch.prefix_groups
        s.process_result(answer(batch))
        s.check_invariants()
    assert grouped_steps >= 10 and not s.running


def test_no_prefix_groups_when_little_is_shared_or_cascade_is_off():
    from scheduler_proc.prefix_groups import MIN_SAVED_READS

    rng = np.random.default_rng(1)
    short, long = list(rng.integers(3, 30000, 300)), list(rng.integers(3, 30000, MIN_SAVED_READS // 4 + 100))
    cases = [(short, ServerArgs(max_running_requests=8)),  # 4 x 300 reads saved: below the threshold
             (long, ServerArgs(max_running_requests=8, disable_cascade_attention=True))]
    for system, args in cases:
        s = Scheduler(args, num_kv_slots=40_000, context_length=8192)
        for i in range(5):
            s.add_request(request(f"r{i}", system + [5 + i], max_new=6, ignore_eos=True))
        decode_steps = 0
        for _ in range(100):
            batch = s.schedule().batch
            if batch is None:
                break
            assert not batch.prefix_groups
            decode_steps += batch.is_decode
            s.process_result(answer(batch))
        assert decode_steps >= 5


# --- queues: identity, O(1) removal, order ----------------------------------------------------------------


def make_req(rid: str = "r", arrival: int = 0) -> Req:
    return Req(rid=rid, prompt_ids=np.arange(3, 8, dtype=np.int32), sampling=wire.SamplingParams(), reply_to=0,
               stop_ids=frozenset({2}), arrival=arrival)


def test_requests_compare_by_identity():
    a, b = make_req(), make_req()  # equal field by field
    assert a != b and a == a and len({a, b}) == 2
    running = RunningSet()
    running.add(a)
    running.add(b)
    assert len(running) == 2
    running.remove(b)
    assert list(running) == [a] and list(running.prefilling) == [a]
    waiting = WaitingQueue()
    waiting.push_back(b)
    waiting.push_back(make_req())
    waiting.remove(b)
    assert len(waiting) == 1 and b not in list(waiting)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["back", "front", "remove"]), st.integers(0, 99)), max_size=60))
def test_waiting_queue_keeps_the_order_of_a_deque(ops):
    pool = [make_req(f"r{i}", i) for i in range(8)]
    queue, ref = WaitingQueue(), deque()
    for op, k in ops:
        queued = list(ref)
        free = [r for r in pool if r not in queued]
        if op == "remove" and queued:
            queue.remove(queued[k % len(queued)])
            ref.remove(queued[k % len(queued)])
        elif op == "back" and free:
            queue.push_back(free[k % len(free)])
            ref.append(free[k % len(free)])
        elif op == "front" and free:
            queue.push_front(free[k % len(free)])
            ref.appendleft(free[k % len(free)])
        assert list(queue) == list(ref) and len(queue) == len(ref) and bool(queue) == bool(ref)
        queue.check_invariants()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "prefilled", "remove"]), st.integers(0, 99)), max_size=60))
def test_running_set_keeps_admission_order(ops):
    pool = [make_req(f"r{i}", i) for i in range(8)]
    running, ref = RunningSet(), []
    for op, k in ops:
        free = [r for r in pool if r not in ref]
        prefilling = [r for r in ref if r.stage == Stage.PREFILL]
        if op == "add" and free:
            running.add(free[k % len(free)])
            ref.append(free[k % len(free)])
        elif op == "prefilled" and prefilling:
            running.prefilled(prefilling[k % len(prefilling)])
        elif op == "remove" and ref:
            running.remove(ref.pop(k % len(ref)))
        assert list(running) == ref and len(running) == len(ref)
        assert list(running.prefilling) == [r for r in ref if r.stage == Stage.PREFILL]
        running.check_invariants()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), max_size=6), max_size=6), st.lists(st.integers(0, 2), max_size=6),
       st.lists(st.integers(0, 2), max_size=6))
def test_computing_prompts_finds_a_shared_head(prompts, head, late):
    as_arr = [np.asarray(p, dtype=np.int32) for p in prompts]
    computing = ComputingPrompts(list(as_arr))
    for h in (head, head[:2], head):
        h = np.asarray(h, dtype=np.int32)
        assert computing.shares(h) == any(len(p) >= len(h) and np.array_equal(p[:len(h)], h) for p in as_arr)
    computing.add(np.asarray(late, dtype=np.int32))  # added after heads of these lengths were indexed
    as_arr.append(np.asarray(late, dtype=np.int32))
    h = np.asarray(head, dtype=np.int32)
    assert computing.shares(h) == any(len(p) >= len(h) and np.array_equal(p[:len(h)], h) for p in as_arr)


def test_a_retracted_request_goes_back_to_the_front_of_the_queue():
    s = Scheduler(ServerArgs(max_running_requests=2, new_token_ratio=0.05), num_kv_slots=25, context_length=64)
    s.add_request(request("x", list(range(3, 11)), max_new=10, ignore_eos=True))
    s.add_request(request("y", list(range(20, 28)), max_new=10, ignore_eos=True))
    s.add_request(request("z", list(range(40, 48)), max_new=10, ignore_eos=True))  # no free row: waits
    while not s.counters.retracted_requests:
        s.process_result(answer(s.schedule().batch))
    assert [r.rid for r in s.waiting] == ["y", "z"] and [r.rid for r in s.running] == ["x"]


# --- info(), the invariant flag, token validation ---------------------------------------------------------


def test_info_counts_exactly_after_admit_finish_abort_retract(caplog):
    s = Scheduler(ServerArgs(max_running_requests=4, new_token_ratio=0.05), num_kv_slots=25, context_length=64)
    s.add_request(request("x", list(range(3, 11)), max_new=10, ignore_eos=True))
    s.add_request(request("y", list(range(20, 28)), max_new=10, ignore_eos=True))
    s.add_request(request("z", list(range(40, 48)), max_new=10))
    s.abort("z")  # while waiting: never admitted
    # x prefills, then y (x's reservation left no room for both), then both decode until KV runs out after
    # 5 tokens each: y (the later admitted) is retracted; x decodes to 10; y comes back (its prompt cached).
    steps = 0
    with caplog.at_level(logging.WARNING, logger="radixserve.scheduler"):
        while (batch := s.schedule().batch) is not None:
            s.process_result(answer(batch))
            steps += 1
            if steps == 6:  # the step before the retraction: the KV is full
                mid = s.info()
                assert (mid.num_running_reqs, mid.num_waiting_reqs, mid.kv_free_tokens,
                        mid.token_usage) == (2, 0, 0, 1.0)
    assert [r.message for r in caplog.records] == ["KV cache full: retracting request y (13 tokens)"]
    s.add_request(request("w", list(range(20, 28)) + [60], max_new=10, ignore_eos=True))  # y's prompt: cached
    for _ in range(2):
        s.process_result(answer(s.schedule().batch))
    s.abort("w")  # while decoding
    s.check_invariants()
    s.cache.check_invariants = s.allocator.free_slots = None  # info() walks nothing
    info = s.info()
    assert isinstance(info, wire.SchedulerStats)
    assert (info.num_running_reqs, info.num_waiting_reqs, info.max_total_num_tokens) == (0, 0, 24)
    assert (info.prompt_tokens, info.cached_tokens, info.generated_tokens) == (8 + 8 + 9, 8, 10 + 10 + 2)
    assert (info.finished_requests, info.aborted_requests, info.retracted_requests) == (2, 2, 1)
    assert (steps, info.forward_steps, info.cascade_decode_steps) == (16, 18, 0)
    assert info.kv_free_tokens == s.allocator.num_free and info.kv_free_tokens + info.kv_cached_tokens == 24
    assert info.kv_evictable_tokens == info.kv_cached_tokens == s.cache.total_size and info.token_usage == 0.0
    assert (info.num_sessions, info.session_pinned_tokens, info.session_kv_budget) == (0, 0, 65536)


def test_invariant_checks_run_only_when_enabled_and_idle():
    def counted(s: Scheduler) -> list[int]:
        calls = [0]
        check = s.check_invariants

        def wrapper() -> None:
            calls[0] += 1
            check()
        s.check_invariants = wrapper
        return calls

    off = Scheduler(ServerArgs(max_running_requests=4), num_kv_slots=200, context_length=128)
    off.add_request(request("a", list(range(3, 13)), max_new=3))
    run_until_idle(off)
    off_calls = counted(off)
    assert off.maybe_check_invariants() == "unchecked" and off_calls == [0]

    s = Scheduler(ServerArgs(max_running_requests=4, enable_invariant_checks=True), num_kv_slots=200,
                  context_length=128)
    calls = counted(s)
    assert s.maybe_check_invariants() == "ok" and calls == [1]
    assert s.maybe_check_invariants() == "ok" and calls == [1]  # nothing changed: the last result
    s.add_request(request("a", list(range(3, 13)), max_new=3))
    batch = s.schedule().batch
    assert s.maybe_check_invariants() == "ok" and calls == [1]  # a step in flight
    s.process_result(answer(batch))
    assert s.maybe_check_invariants() == "ok" and calls == [1]  # running
    run_until_idle(s)
    assert calls == [3]  # run_until_idle checks after each of its 2 steps
    assert s.maybe_check_invariants() == "ok" and calls == [4]
    leaked = s.allocator.alloc(1)  # a slot that nothing owns
    assert s.maybe_check_invariants() == "ok" and calls == [4]  # the scheduler changed nothing since
    assert s.flush_cache()
    assert s.maybe_check_invariants().startswith("violated: slots: ") and calls == [5]
    s.allocator.free(leaked)
    assert s.maybe_check_invariants().startswith("violated: ") and calls == [5]  # cached until the next change


def test_token_ids_are_checked_against_the_vocabulary():
    s = Scheduler(ServerArgs(), num_kv_slots=200, context_length=64, vocab_size=100)
    for ids in ([5, 100], [-1, 5], [5, 2**70], [2**70, -(2**70)]):
        with pytest.raises(RequestError, match=r"^token ids must be in \[0, 100\); got \[") as e:
            s.add_request(request("r", ids))
        assert e.value.status == 400
    with pytest.raises(RequestError, match=r"^token ids must be in \[0, 100\); got \[100, -3\]$"):
        s.add_request(request("r", [5, 6], stop_token_ids=[100, 4, -3]))
    assert not s.lifecycle.reqs and not s.waiting
    s.add_request(request("r", [0, 99], stop_token_ids=[99]))
    (req,) = s.waiting
    assert req.prompt_ids.dtype == np.int32 and req.prompt_ids.tolist() == [0, 99] and 99 in req.stop_ids


def test_session_pins_are_counted_as_turns_end_and_sessions_close():
    s = Scheduler(ServerArgs(max_running_requests=4, session_kv_budget=40), num_kv_slots=200, context_length=128)
    one, two = s.sessions.open(None, 0, None), s.sessions.open(None, 0, None)
    s.add_request(wire.GenerateTokens(rid="t1", input_ids=list(range(3, 13)), session=wire.SessionParams(id=one),
                                      sampling=wire.SamplingParams(max_new_tokens=4, ignore_eos=True)))
    run_until_idle(s)
    assert s.info().session_pinned_tokens == 10 + 4 - 1  # prompt + output, less the last token (no KV yet)
    s.add_request(wire.GenerateTokens(rid="t2", input_ids=list(range(50, 80)), session=wire.SessionParams(id=two),
                                      sampling=wire.SamplingParams(max_new_tokens=4, ignore_eos=True)))
    run_until_idle(s)
    assert s.info().session_pinned_tokens == 33  # within the budget of 40 only once the older pin went
    s.sessions.close(two)
    s.check_invariants()
    info = s.info()
    assert (info.num_sessions, info.session_pinned_tokens, info.session_kv_budget) == (1, 0, 40)


def test_a_stop_string_before_a_retraction_point_keeps_the_tree_whole():
    """A re-admitted request's cached prefix holds output (its KV went into the tree at retraction); a stop string
    that ends the output inside that prefix drops the tokens, not the tree's KV."""
    s = Scheduler(ServerArgs(max_running_requests=2, new_token_ratio=0.05), num_kv_slots=25, context_length=64)
    s.add_request(request("x", list(range(3, 11)), max_new=10, ignore_eos=True))
    s.add_request(request("y", list(range(20, 28)), max_new=10, ignore_eos=True))
    while not s.counters.retracted_requests:
        s.process_result(answer(s.schedule().batch))
    y = s.lifecycle.reqs["y"]
    while y.stage != Stage.DECODE:
        s.process_result(answer(s.schedule().batch))
    assert y.prefix_len > len(y.prompt_ids) + 1  # its prefix in the tree holds output
    ((_, out),) = s.abort("y", wire.FinishReason(type="stop", matched="\n", length=1)).outs
    assert out.completion_tokens == 1 and y.output_ids == [7]
    s.check_invariants()
    run_until_idle(s)
    assert s.allocator.num_free + s.cache.evictable_size == s.allocator.capacity


@pytest.mark.parametrize("overlap", [False, True])
def test_a_request_the_workers_cannot_admit_ends_alone(overlap):
    """StepResult.admit_errors: that request ends with a 400 and its message, its KV freed; the step's other
    requests go on. With overlap the next step (which carries it again) is in flight when the error comes."""
    s = Scheduler(ServerArgs(max_running_requests=4), num_kv_slots=200, context_length=128)
    for rid in ("a", "bad", "c"):
        s.add_request(request(rid, list(range(3, 13)), max_new=4, ignore_eos=True))
    first = s.schedule().batch
    slot = {nr.req_slot for nr in first.new_reqs} - {s.lifecycle.reqs[r].req_slot for r in ("a", "c")}
    second = s.schedule().batch if overlap else None
    result = answer(first)
    result.admit_errors = [(slot.pop(), "cannot build its grammar matcher")]
    outcome = s.process_result(result)
    assert [(r.rid, r.status, r.message) for _, r in outcome.replies] == [
        ("bad", 400, "cannot build its grammar matcher")]
    assert sorted(o.rid for _, o in outcome.outs) == ["a", "c"] and "bad" not in s.lifecycle.reqs
    assert (s.counters.finished_requests, s.counters.aborted_requests) == (0, 0)  # a rejection: counted nowhere
    if second is not None:
        assert not [o for _, o in s.process_result(answer(second)).outs if o.rid == "bad"]
    outs = run_until_idle(s)
    assert {o.rid: o.completion_tokens for o in outs if o.finish is not None} == {"a": 4, "c": 4}
    assert s.allocator.num_free + s.cache.evictable_size == s.allocator.capacity


def test_a_request_ends_once_and_an_unknown_control_call_is_an_error():
    s = Scheduler(ServerArgs(max_running_requests=4), num_kv_slots=200, context_length=128)
    s.add_request(request("r", list(range(3, 13)), max_new=4))
    s.process_result(answer(s.schedule().batch))
    req = s.lifecycle.reqs["r"]
    assert len(s.abort("r").outs) == 1 and not s.abort("r").outs  # the second finds nothing to end
    with pytest.raises(AssertionError, match="ended twice"):
        s.lifecycle.end(req, wire.FinishReason(type="abort", message="again"), Outcome())
    s.check_invariants()
    assert s.allocator.num_free + s.cache.evictable_size == s.allocator.capacity
    runtime = wire.RuntimeInfo(num_kv_slots=200, context_length=128, vocab_size=100, device="cpu", dtype="float32",
                               attention_backend="torch", kv_bytes_per_token=0, weight_bytes=0)
    with pytest.raises(TypeError, match="no handler for control call Abort"):
        handle_control(s, runtime, wire.Abort(rid="r"))
    (dest, reply), = handle_control(s, runtime, wire.CloseSession(call_id="c", session_id="none", reply_to=2)).replies
    assert dest == 2 and reply.status == 400 and "not open" in reply.error
