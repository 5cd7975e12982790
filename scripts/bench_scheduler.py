"""Scheduler micro-benchmark: a stand-in answers each step (sampled ids from numpy, no model).

(a) Per-step scheduler time, schedule() + process_result(), at 1,000 running requests with 50 finishing
    per decode step and 50 arriving per cycle (a prefill step admitting them, then a decode step).
(b) Server-info latency with 1M tokens in the radix cache: the scheduler's part of the /get_server_info
    reply (info() and the invariant status, encoded), and for reference the full check_invariants() walk.

Run from the repository root: `python scripts/bench_scheduler.py`. It imports the scheduler of the tree it
sits in, so a copy of this file in an older checkout measures that checkout (an older Scheduler without
maybe_check_invariants() is measured as its /get_server_info ran: info() plus check_invariants()).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radixserve import wire  # noqa: E402
from radixserve.config import ServerArgs  # noqa: E402
from scheduler_proc.scheduler import Scheduler  # noqa: E402

RUNNING = 1000
TURNOVER = 50  # requests finishing (and arriving) per decode step
PROMPT_LEN = 128


def answer(batch: wire.StepBatch, rng: np.random.Generator) -> wire.StepResult:
    """The workers' stand-in: one sampled id per request (never EOS: requests run to max_new_tokens)."""
    n = len(wire.from_i32(batch.req_slots))
    return wire.StepResult(step=batch.step, next_ids=wire.i32(rng.integers(3, 30000, n).tolist()),
                           next_logprobs=np.zeros(n, np.float32).tobytes())


def request(rid: str, ids: np.ndarray, max_new: int) -> wire.GenerateTokens:
    return wire.GenerateTokens(rid=rid, input_ids=ids.tolist(), eos_token_ids=[2],
                               sampling=wire.SamplingParams(max_new_tokens=max_new, ignore_eos=True))


def stats_ms(samples: list[float]) -> str:
    a = np.asarray(samples) * 1e3
    return f"mean {a.mean():7.3f}  p50 {np.percentile(a, 50):7.3f}  p99 {np.percentile(a, 99):7.3f} ms"


def bench_steps(cycles: int) -> None:
    """Steady state: each cycle 50 requests arrive (a prefill step) and 50 finish (a decode step)."""
    rng = np.random.default_rng(0)
    lifetime = RUNNING // TURNOVER  # decode steps a request lives (plus its prefill step's token)
    args = ServerArgs(max_running_requests=RUNNING + 2 * TURNOVER, chunked_prefill_size=8192,
                      max_prefill_tokens=1 << 16)
    s = Scheduler(args, num_kv_slots=1 << 18, context_length=4096)
    # Warm-up population: group k of 50 ends after decode step k + 1, so every decode step ends 50.
    for i in range(RUNNING):
        s.add_request(request(f"w{i}", rng.integers(3, 30000, PROMPT_LEN), max_new=2 + i // TURNOVER))
    while s.waiting or any(r.stage.value != "decode" for r in s.running):
        s.process_result(answer(s.schedule().batch, rng))
    assert len(s.running) == RUNNING, len(s.running)
    timings: dict[str, list[float]] = {"add_request x50": [], "prefill step": [], "decode step": []}
    finished = []
    gc.collect()
    for c in range(cycles):
        new = [request(f"c{c}-{j}", rng.integers(3, 30000, PROMPT_LEN), max_new=lifetime + 2)
               for j in range(TURNOVER)]
        t0 = time.perf_counter()
        for msg in new:
            s.add_request(msg)
        timings["add_request x50"].append(time.perf_counter() - t0)
        for _ in range(2):  # the prefill step admitting the arrivals, then a decode step for all
            t0 = time.perf_counter()
            batch = s.schedule().batch
            t1 = time.perf_counter()
            result = answer(batch, rng)  # the stand-in's time is not the scheduler's
            t2 = time.perf_counter()
            outs = s.process_result(result).outs
            t3 = time.perf_counter()
            timings["decode step" if batch.is_decode else "prefill step"].append((t1 - t0) + (t3 - t2))
            if batch.is_decode:
                finished.append(sum(o.finish is not None for _, o in outs))
    assert len(s.running) == RUNNING and min(finished[lifetime:]) == TURNOVER, (len(s.running), finished)
    print(f"(a) {RUNNING} running, {TURNOVER} finishing per decode step, {TURNOVER} arriving per cycle "
          f"({cycles} cycles, prompts {PROMPT_LEN} tokens)")
    for name, samples in timings.items():
        print(f"    {name:16s} {stats_ms(samples)}")
    steps = timings["prefill step"] + timings["decode step"]
    print(f"    {'all steps':16s} {stats_ms(steps)}")


def fill_cache(target: int) -> Scheduler:
    """A scheduler whose radix cache holds `target` tokens: prompts in 64 families sharing 256 tokens,
    run to completion through the scheduler (one output token each)."""
    rng = np.random.default_rng(1)
    args = ServerArgs(max_running_requests=64, chunked_prefill_size=16384, max_prefill_tokens=1 << 16)
    s = Scheduler(args, num_kv_slots=target + (1 << 16), context_length=2048)
    families = [rng.integers(3, 30000, 256) for _ in range(64)]
    i = 0
    while s.cache.total_size < target:
        for _ in range(64):
            tail = rng.integers(3, 30000, 768)
            s.add_request(request(f"f{i}", np.concatenate([families[i % 64], tail]), max_new=1))
            i += 1
        while (batch := s.schedule().batch) is not None:
            s.process_result(answer(batch, rng))
    return s


def time_call(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_server_info(cached_tokens: int, repeat: int) -> None:
    s = fill_cache(cached_tokens)
    if hasattr(s, "maybe_check_invariants"):
        def server_info() -> bytes:
            return wire.encoder.encode((s.info(), s.maybe_check_invariants()))
        how = "info() + maybe_check_invariants() (flag off), encoded"
    else:  # the older scheduler: /get_server_info ran the invariant walk every time
        def server_info() -> bytes:
            try:
                s.check_invariants()
                invariants = "ok"
            except AssertionError as e:
                invariants = f"violated: {e}"
            return wire.encoder.encode({**s.info(), "invariants": invariants})
        how = "info() + check_invariants(), encoded (the older /get_server_info)"
    gc.collect()
    print(f"(b) server info, {s.cache.total_size:,} tokens cached ({s.allocator.capacity:,} KV slots)")
    print(f"    {how}: {stats_ms(time_call(server_info, repeat))}")
    print(f"    check_invariants() (reference): {stats_ms(time_call(s.check_invariants, max(3, repeat // 10)))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300, help="arrival/finish cycles measured in (a)")
    parser.add_argument("--cached-tokens", type=int, default=1_000_000, help="radix cache size in (b)")
    parser.add_argument("--repeat", type=int, default=200, help="server-info calls timed in (b)")
    ns = parser.parse_args()
    bench_steps(ns.cycles)
    bench_server_info(ns.cached_tokens, ns.repeat)


if __name__ == "__main__":
    main()
