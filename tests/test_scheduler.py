"""Scheduler state machine in isolation: a stand-in for the workers answers each step with token ids.

What runs on real processes is covered by test_engine.py; here the point is the KV bookkeeping
under aborts, retraction and chunking, and the size of per-step messages.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve import wire
from radixserve.config import ServerArgs
from scheduler_proc.scheduler import Scheduler


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
        batch = s.schedule()
        outs += [o for _, o in s.pending_outs]
        s.pending_outs = []
        if batch is None:
            break
        outs += [o for _, o in s.process_result(answer(batch))]
        s.check_invariants()
    return outs


def test_decode_step_message_does_not_grow_with_context():
    args = ServerArgs(max_running_requests=64, chunked_prefill_size=8192, max_prefill_tokens=1 << 20)
    s = Scheduler(args, num_kv_slots=64 * 4200 + 1, context_length=8192)
    for i in range(64):
        s.add_request(request(f"r{i}", list(np.random.default_rng(i).integers(3, 30000, 4096)), max_new=16))
    while any(r.stage.value != "decode" for r in s.running) or s.waiting:
        s.process_result(answer(s.schedule()))
    batch = s.schedule()
    assert batch.is_decode and len(wire.from_i32(batch.req_slots)) == 64
    size = len(wire.encoder.encode(batch))
    assert size < 8 * 1024, f"a 64-request decode step at 4k context is {size} bytes"


def test_abort_in_every_stage_releases_kv():
    s = Scheduler(ServerArgs(max_running_requests=4, chunked_prefill_size=16), num_kv_slots=200, context_length=512)
    s.add_request(request("waiting-1", list(range(3, 43))))
    s.add_request(request("chunked", list(range(3, 63))))
    s.process_result(answer(s.schedule()))  # first chunk of "waiting-1"
    s.check_invariants()
    s.abort("waiting-1")  # mid-prefill
    s.abort("chunked")  # still waiting
    s.check_invariants()
    s.add_request(request("decoding", list(range(3, 13)), max_new=50, ignore_eos=True))
    for _ in range(4):
        s.process_result(answer(s.schedule()))
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
        batch = s.schedule()
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
        s.process_result(answer(s.schedule()))
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
        batch = s.schedule()
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
            batch = s.schedule()
            if batch is None:
                break
            assert not batch.prefix_groups
            decode_steps += batch.is_decode
            s.process_result(answer(batch))
        assert decode_steps >= 5
