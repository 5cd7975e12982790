"""LPM does not starve: a waiting request that matches nothing in the cache is admitted after at most
LPM_MAX_OVERTAKEN later arrivals, however steadily requests that do match keep coming (the scheduler alone,
with a stand-in for the workers, as in test_scheduler.py)."""

from __future__ import annotations

import numpy as np

from radixserve import wire
from radixserve.config import ServerArgs
from scheduler_proc.prefill import LPM_MAX_OVERTAKEN
from scheduler_proc.scheduler import Scheduler

PREFIX = list(range(100, 140))


def _request(rid: str, ids: list[int]) -> wire.GenerateTokens:
    return wire.GenerateTokens(rid=rid, input_ids=ids, eos_token_ids=[2],
                               sampling=wire.SamplingParams(max_new_tokens=4, ignore_eos=True))


def _step(s: Scheduler) -> None:
    batch = s.schedule().batch
    if batch is not None:
        n = len(wire.from_i32(batch.req_slots))
        s.process_result(wire.StepResult(step=batch.step, next_ids=wire.i32([7] * n),
                                         next_logprobs=np.zeros(n, np.float32).tobytes()))


def _later_arrivals_before_admission(policy: str, limit: int) -> int | None:
    """Arrivals after the unmatched request by the time it leaves the queue (None: still waiting at `limit`)."""
    s = Scheduler(ServerArgs(max_running_requests=2, schedule_policy=policy), num_kv_slots=4000, context_length=512)
    s.add_request(_request("warm", PREFIX + [5]))
    while s.running or s.waiting:
        _step(s)
    for i in range(4):  # a queue of matching requests first, then the one that matches nothing
        s.add_request(_request(f"m{i}", PREFIX + [10 + i]))
    s.add_request(_request("cold", list(range(1000, 1040))))
    for later in range(limit):
        if not any(r.rid == "cold" for r in s.waiting):
            return later
        s.add_request(_request(f"x{later}", PREFIX + [200 + later % 50, later]))  # matching ones keep coming
        _step(s)
        _step(s)
    return None


def test_lpm_admits_an_unmatched_request_within_the_bound() -> None:
    later = _later_arrivals_before_admission("lpm", limit=4 * LPM_MAX_OVERTAKEN)
    assert later is not None and later <= LPM_MAX_OVERTAKEN + 1, later


def test_fcfs_admits_it_in_turn() -> None:
    later = _later_arrivals_before_admission("fcfs", limit=4 * LPM_MAX_OVERTAKEN)
    assert later is not None and later <= 8, later
