"""The scheduler's cumulative counters, bumped where each event happens (so reading them is O(1))."""

from __future__ import annotations

from dataclasses import dataclass


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
