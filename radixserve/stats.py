"""Statistics that travel on the wire (radixserve/wire.py's control replies carry them, and wire re-exports them):
cumulative histograms, a tokenizer's counts of the requests it served with the call that asks for them, and the
scheduler's counters and gauges. A tokenizer's add up, so the gateway sums them for /metrics
(radixserve/gateway/metrics.py)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import msgspec


class Histogram(msgspec.Struct, array_like=True):
    """Observations since start against fixed upper bounds: counts[i] holds those in (bounds[i-1], bounds[i]],
    the last count those above bounds[-1]. Histograms with the same bounds add up bucket by bucket."""

    bounds: list[float]
    counts: list[int]
    sum: float = 0.0

    @classmethod
    def empty(cls, bounds: Sequence[float]) -> Histogram:
        return cls([float(b) for b in bounds], [0] * (len(bounds) + 1))

    def observe(self, value: float, n: int = 1) -> None:
        """Record `value` n times (O(log buckets))."""
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def __add__(self, other: Histogram) -> Histogram:
        assert self.bounds == other.bounds, "histograms with different buckets"
        return Histogram(self.bounds, [a + b for a, b in zip(self.counts, other.counts, strict=True)],
                         self.sum + other.sum)


class GetTokenizerStats(msgspec.Struct, tag=True):
    """Gateway -> every tokenizer, answered by the tokenizer itself: a ControlReply with its TokenizerStats."""

    call_id: str


class TokenizerStats(msgspec.Struct, tag=True):
    """One tokenizer's counts of the requests it served (those with GenerateText.log_metrics), since start: each is
    counted once, when it ends, with the counts its client was given; the timings are measured as its tokens arrive."""

    num_requests: int  # ended, for any reason
    num_aborted_requests: int  # of those, ended by an abort
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int
    time_to_first_token: Histogram  # from the tokenizer's receipt of the request to its first output token
    inter_token_latency: Histogram  # between output tokens, one observation per token after the first
    e2e_request_latency: Histogram  # from receipt to the request's end

    def __add__(self, other: TokenizerStats) -> TokenizerStats:
        return TokenizerStats(*(a + b for a, b in zip(msgspec.structs.astuple(self),
                                                      msgspec.structs.astuple(other), strict=True)))


class SchedulerStats(msgspec.Struct):
    """The scheduler's counters and gauges (all O(1) to read)."""

    num_running_reqs: int
    num_waiting_reqs: int
    max_total_num_tokens: int
    kv_free_tokens: int
    kv_cached_tokens: int
    kv_evictable_tokens: int
    token_usage: float
    num_sessions: int
    session_pinned_tokens: int
    session_kv_budget: int
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    finished_requests: int
    aborted_requests: int
    retracted_requests: int
    forward_steps: int
    cascade_decode_steps: int
    evicted_tokens: int  # freed from the radix cache to make room
    queue_time: Histogram  # seconds from arrival to first admission, per admitted request
    spec_accept_length: Histogram  # tokens per request per verify step (speculative decoding)
