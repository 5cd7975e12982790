"""Per-request results and their summary: throughputs, latency percentiles, cache hit rate (serve and offline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
LATE_TURN = 3  # `ttft_ms_late_turns`: the TTFT of turn 3 and later of multi-turn conversations


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    latency: float | None = None  # s, request sent to last token (None offline: only the batch is timed)
    ttft: float | None = None  # s, to the first output token (streamed requests only)
    itl: list[float] = field(default_factory=list)  # s, between output tokens
    error: str | None = None
    turn: int = 0  # index of the turn in its conversation (multi-turn datasets)
    spec_verify_ct: int = 0  # speculative verify steps it took (meta_info; native backend)


def stats_ms(values_s: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99 in milliseconds."""
    a = np.asarray(values_s, dtype=np.float64) * 1e3
    return {"mean": float(a.mean()), **{f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Figures of one run; throughputs count completed requests over the whole run's wall time."""
    ok = [r for r in results if r.error is None]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    out: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "input_tokens": prompt, "output_tokens": output, "cached_tokens": cached,
        "request_throughput": len(ok) / duration, "input_throughput": prompt / duration,
        "output_throughput": output / duration, "total_throughput": (prompt + output) / duration,
        "cache_hit_rate": cached / prompt if prompt else 0.0,
    }
    speculated = [r for r in ok if r.spec_verify_ct]
    if speculated:  # SGLang's accept length: output tokens per verify step
        out["spec_accept_length"] = sum(r.output_tokens for r in speculated) / sum(r.spec_verify_ct for r in speculated)
    latencies = [r.latency for r in ok if r.latency is not None]
    if latencies:
        out["e2e_latency_ms"] = stats_ms(latencies)
        out["concurrency"] = sum(latencies) / duration  # mean requests in flight
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    if ttfts:
        out["ttft_ms"] = stats_ms(ttfts)
        if any(r.turn for r in ok):
            out["ttft_ms_by_turn"] = _ttft_by_turn(ok)
        late = [r.ttft for r in ok if r.ttft is not None and r.turn >= LATE_TURN - 1]
        if late:  # turns whose prompt holds two earlier answers: what a cache that outlives the device pool saves
            out["ttft_ms_late_turns"] = stats_ms(late)
    itls = [x for r in ok for x in r.itl]
    if itls:
        out["itl_ms"] = stats_ms(itls)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
             if r.latency is not None and r.ttft is not None and r.output_tokens > 1]
    if tpots:
        out["tpot_ms"] = stats_ms(tpots)
    return out


def _ttft_by_turn(ok: list[RequestResult]) -> list[dict[str, Any]]:
    """TTFT per turn index, with the turn's mean prompt and cached tokens: does a longer but cached prompt
    start as fast as the first turn?"""
    rows = []
    for turn in sorted({r.turn for r in ok}):
        rs = [r for r in ok if r.turn == turn and r.ttft is not None]
        if rs:
            rows.append({"turn": turn + 1, "requests": len(rs),
                         "prompt_tokens": float(np.mean([r.prompt_tokens for r in rs])),
                         "cached_tokens": float(np.mean([r.cached_tokens for r in rs])),
                         **stats_ms([r.ttft for r in rs])})
    return rows


def first_error(results: list[RequestResult]) -> str | None:
    return next((r.error for r in results if r.error is not None), None)
