"""GET /metrics: the scheduler's and the tokenizers' counters in Prometheus' text format, read at scrape time.

Names are `radixserve:` + SGLang's metric names, labelled `model_name` as SGLang's, so an SGLang dashboard works
with the prefix changed. Nothing is counted here: a scrape makes two O(1) calls, GetServerInfo to the scheduler
(answered between two of its steps: its loop never waits on HTTP) and GetTokenizerStats to every tokenizer
(summed), and hands their totals to prometheus_client as metric families. So every counter is the exact count
kept where its event happens: scheduler_proc/counters.py and tokenizer_proc/metrics.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from radixserve import wire
from radixserve.errors import ApiError
from radixserve.gateway.tokenizer_client import TokenizerClient
from radixserve.stats import Histogram, TokenizerStats

PREFIX = "radixserve:"
SCRAPE_TIMEOUT_S = 10.0  # Prometheus' default scrape_timeout
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes


class _Families(Collector):
    """One scrape's metric families, from the scheduler's and the tokenizers' stats."""

    def __init__(self, model_name: str, sched: wire.SchedulerStats, front: TokenizerStats) -> None:
        self.labels = [model_name]
        self.sched = sched
        self.front = front

    def collect(self) -> Iterator[Metric]:
        s, f = self.sched, self.front
        used = s.max_total_num_tokens - s.kv_free_tokens - s.kv_evictable_tokens
        yield from (
            self._gauge("num_running_reqs", "Requests running (admitted, not finished).", s.num_running_reqs),
            self._gauge("num_queue_reqs", "Requests in the waiting queue.", s.num_waiting_reqs),
            self._gauge("num_used_tokens", "KV cache tokens held by running requests.", used),
            self._gauge("token_usage", "Fraction of the KV cache held by running requests.",
                        used / s.max_total_num_tokens if s.max_total_num_tokens else 0.0),
            self._gauge("max_total_num_tokens", "KV cache size in tokens.", s.max_total_num_tokens),
            self._gauge("cache_hit_rate", "Prompt tokens found in the radix cache / prompt tokens, over all "
                        "requests admitted since start.",
                        s.cached_tokens / s.prompt_tokens if s.prompt_tokens else 0.0),
            self._gauge("num_open_sessions", "Open sessions.", s.num_sessions),
            self._gauge("session_pinned_tokens", "KV cache tokens pinned by open sessions.", s.session_pinned_tokens),
            self._counter("num_retracted_requests_total", "Requests put back in the queue when decode ran out of "
                          "KV cache.", s.retracted_requests),
            self._counter("evicted_tokens_total", "Tokens evicted from the radix cache to make room.",
                          s.evicted_tokens),
            self._histogram("queue_time_seconds", "Time from arrival in the scheduler to first admission.",
                            s.queue_time),
            self._histogram("spec_accept_length", "Tokens a request gains per speculative verify step (accepted "
                            "drafts + 1).", s.spec_accept_length),
            self._counter("num_requests_total", "Requests ended (finished or aborted).", f.num_requests),
            self._counter("num_aborted_requests_total", "Requests ended by an abort.", f.num_aborted_requests),
            self._counter("prompt_tokens_total", "Prompt tokens of ended requests.", f.prompt_tokens),
            self._counter("generation_tokens_total", "Output tokens of ended requests.", f.generation_tokens),
            self._counter("cached_tokens_total", "Prompt tokens of ended requests found in the radix cache.",
                          f.cached_tokens),
            self._histogram("time_to_first_token_seconds", "Time to first output token.", f.time_to_first_token),
            self._histogram("inter_token_latency_seconds", "Time between output tokens.", f.inter_token_latency),
            self._histogram("e2e_request_latency_seconds", "End-to-end request latency.", f.e2e_request_latency),
        )

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
        family.add_metric(self.labels, value)
        return family

    def _counter(self, name: str, doc: str, value: int) -> Metric:
        family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
        family.add_metric(self.labels, value)
        return family

    def _histogram(self, name: str, doc: str, h: Histogram) -> Metric:
        family = HistogramMetricFamily(PREFIX + name, doc, labels=["model_name"])
        cumulative = list(itertools.accumulate(h.counts))
        buckets = [(floatToGoString(b), n) for b, n in zip(h.bounds, cumulative)] + [("+Inf", cumulative[-1])]
        family.add_metric(self.labels, buckets, h.sum)
        return family


async def scrape(client: TokenizerClient, model_name: str) -> web.Response:
    """The exposition in Prometheus' text format 0.0.4, whatever the Accept header prefers: prometheus_client's
    OpenMetrics output turns the colons of sample names (not of their HELP/TYPE lines) into underscores
    (prometheus/client_python#1177), which would break the `radixserve:` names. Every Prometheus reads 0.0.4."""
    reply, front = await asyncio.gather(client.control(wire.GetServerInfo, timeout=SCRAPE_TIMEOUT_S),
                                        client.tokenizer_stats(SCRAPE_TIMEOUT_S))
    if not reply.ok or not isinstance(reply.result, wire.ServerStatus):
        raise ApiError(503, reply.error or "the scheduler gave no statistics")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(model_name, reply.result.scheduler, front))
    return web.Response(body=generate_latest(registry), headers={"Content-Type": TEXT_FORMAT})
