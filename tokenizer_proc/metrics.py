"""A tokenizer front end's request metrics: counts and timings of the requests it serves, read in O(1).

A request is counted once, when it ends (finished or aborted), with the token counts its client is given;
its timings are taken as its outputs arrive here, which is every step of every request (the gateway sees
only the final delta of a non-streamed one). The gateway sums the TokenizerStats of all tokenizers for
/metrics (radixserve/gateway/metrics.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from radixserve import wire
from radixserve.stats import Histogram, TokenizerStats

# SGLang's buckets (seconds), so its dashboards' quantiles read the same.
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
               0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400)


@dataclass(slots=True)
class _Timing:
    start: float
    last_token: float | None = None  # when its latest output token arrived


class RequestMetrics:
    """Invariant: `_live` holds exactly the requests counted on their end that have not ended yet."""

    def __init__(self) -> None:
        self.stats = TokenizerStats(
            num_requests=0, num_aborted_requests=0, prompt_tokens=0, generation_tokens=0, cached_tokens=0,
            time_to_first_token=Histogram.empty(TTFT_BUCKETS),
            inter_token_latency=Histogram.empty(ITL_BUCKETS),
            e2e_request_latency=Histogram.empty(E2E_BUCKETS))
        self._live: dict[str, _Timing] = {}

    def start(self, rid: str) -> None:
        self._live[rid] = _Timing(time.perf_counter())

    def tokens(self, rid: str, n: int) -> None:
        """`n` output tokens of `rid` arrived now: its first token's latency, else n inter-token gaps."""
        timing = self._live.get(rid)
        if timing is None or n <= 0:
            return
        now = time.perf_counter()
        if timing.last_token is None:
            self.stats.time_to_first_token.observe(now - timing.start)
            timing.last_token = now
            n -= 1
        if n:  # several tokens in one output (not so today: a step samples one) share its gap
            self.stats.inter_token_latency.observe((now - timing.last_token) / n, n)
        timing.last_token = now

    def end(self, last: wire.TextDelta) -> float | None:
        """The request's final delta (its `finish` set): count it; its seconds from start to end (None: a request
        not counted)."""
        timing = self._live.pop(last.rid, None)
        if timing is None:
            return None
        s = self.stats
        s.num_requests += 1
        s.num_aborted_requests += int(last.finish is not None and last.finish.type == "abort")
        s.prompt_tokens += last.prompt_tokens
        s.generation_tokens += last.completion_tokens
        s.cached_tokens += last.cached_tokens
        seconds = time.perf_counter() - timing.start
        s.e2e_request_latency.observe(seconds)
        return seconds

    def drop(self, rid: str) -> None:
        """A request that never ran (rejected): not counted."""
        self._live.pop(rid, None)
