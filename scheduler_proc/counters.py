"""The scheduler's cumulative counters, bumped where each event happens (so reading them is O(1))."""

from __future__ import annotations

from dataclasses import dataclass, field

from radixserve.stats import Histogram

# SGLang's queue_time_seconds buckets, so its dashboards' quantiles read the same.
QUEUE_TIME_BUCKETS = (0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300, 400,
                      500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000)

ACCEPT_LENGTH_BUCKETS = tuple(range(1, 17))


@dataclass(slots=True)
class Counters:
    prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission only)
    cached_tokens: int = 0  # of those, found in the radix cache
    generated_tokens: int = 0
    finished_requests: int = 0  # ended by a stop, a length limit or a stop string
    aborted_requests: int = 0
    retracted_requests: int = 0  # put back in the queue when decode ran out of KV
    forward_steps: int = 0
    cascade_decode_steps: int = 0  # decode steps that carried prefix groups
    evicted_tokens: int = 0  # radix-cache tokens freed to make room (BlockTable.alloc)
    queue_time: Histogram = field(default_factory=lambda: Histogram.empty(QUEUE_TIME_BUCKETS))  # at first admission
    # Tokens a request emits per verify step (accepted drafts + 1), one observation per request and step.
    spec_accept_length: Histogram = field(default_factory=lambda: Histogram.empty(ACCEPT_LENGTH_BUCKETS))
