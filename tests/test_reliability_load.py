"""Load: dozens of concurrent clients, each looping over mixed work (native and OpenAI, chat, streamed or not,
stop strings, sessions with a fork) for a while. No request fails or stalls, and afterwards nothing is pending,
no KV is held, no session is left open and the scheduler's invariants hold."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time

import aiohttp
from reliability_util import leak_problems, report, size, wait_idle
from server_fixture import RadixServer

CLIENTS = size(ci=16, long=64)
DURATION_S = size(ci=10, long=600)
# A request slower than this is a stall. 64 clients on 2 shared cores wait their turn for a minute or more
# (docs/reliability.md has the latencies), so the long size allows more.
STALL_S = float(size(ci=120, long=300))


class Failure(Exception):
    pass


async def _post(http: aiohttp.ClientSession, path: str, body: dict) -> object:
    async with http.post(path, json=body) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise Failure(f"{path}: {resp.status} {text[:300]}")
        if resp.content_type == "text/event-stream":
            events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
            if events[-1:] != ["[DONE]"] or any('"error"' in e[:10] for e in events):
                raise Failure(f"{path}: a stream that did not end well: {text[-300:]}")
            return [json.loads(e) for e in events[:-1]]
        return json.loads(text)


def _words(rng: random.Random) -> str:
    return " ".join(rng.choice(["red", "sky", "river", "stone", "seven", "light", "story", "why"])
                    for _ in range(rng.randrange(3, 30)))


async def _native(http: aiohttp.ClientSession, rng: random.Random) -> None:
    stream = rng.random() < 0.5
    out = await _post(http, "/generate", {"text": _words(rng), "stream": stream, "sampling_params": {
        "max_new_tokens": rng.randrange(1, 32), "temperature": rng.choice([0, 0.7])}})
    last = out[-1] if stream else out
    assert last["meta_info"]["finish_reason"] is not None


async def _completion(http: aiohttp.ClientSession, rng: random.Random) -> None:
    await _post(http, "/v1/completions", {"model": "default", "prompt": _words(rng), "max_tokens": rng.randrange(1, 24),
                                          "stream": rng.random() < 0.5, "n": rng.choice([1, 1, 2])})


async def _chat_with_stops(http: aiohttp.ClientSession, rng: random.Random) -> None:
    out = await _post(http, "/v1/chat/completions", {
        "model": "default", "messages": [{"role": "user", "content": _words(rng)}], "max_tokens": 32,
        "stop": [".", "\n", " the"], "temperature": 0.5, "stream": rng.random() < 0.5})
    if isinstance(out, dict):
        content = out["choices"][0]["message"]["content"]
        assert not any(s in content for s in (".", "\n", " the")), content


async def _session_with_fork(http: aiohttp.ClientSession, rng: random.Random) -> None:
    sid = await _post(http, "/open_session", {"capacity_of_str_len": 4096})
    try:
        first = await _post(http, "/generate", {"text": _words(rng), "session_params": {"id": sid},
                                                "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
        parent = first["meta_info"]["id"]
        branches = [_post(http, "/generate", {"text": _words(rng), "session_params": {"id": sid, "rid": parent},
                                              "sampling_params": {"max_new_tokens": 8}}) for _ in range(2)]
        await asyncio.gather(*branches)  # two turns continue the same parent: a fork
    finally:
        await _post(http, "/close_session", {"session_id": sid})


KINDS = {"native": _native, "completion": _completion, "chat with stops": _chat_with_stops,
         "session with fork": _session_with_fork}


async def _client(url: str, seed: int, deadline: float, done: collections.Counter, latencies: list[float],
                  failures: list[str]) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=STALL_S)) as http:
        while time.monotonic() < deadline:
            name = rng.choice(list(KINDS))
            started = time.monotonic()
            try:
                await KINDS[name](http, rng)
                done[name] += 1
            except (Failure, AssertionError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                failures.append(f"{name}: {e!r}"[:400])
            latencies.append(time.monotonic() - started)


async def _load(url: str) -> tuple[collections.Counter, list[float], list[str]]:
    done: collections.Counter = collections.Counter()
    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + DURATION_S
    await asyncio.gather(*(_client(url, seed, deadline, done, latencies, failures) for seed in range(CLIENTS)))
    return done, latencies, failures


def test_mixed_clients(server: RadixServer) -> None:
    started = time.monotonic()
    done, latencies, failures = asyncio.run(_load(server.url))
    info = wait_idle(server, timeout=60)
    latencies.sort()
    figures = {"clients": CLIENTS, "seconds": round(time.monotonic() - started, 1), "by_kind": dict(done),
               "failures": len(failures), "leaks": leak_problems(info),
               "sessions_open": info["scheduler"]["num_sessions"],
               "requests": len(latencies), "latency_p50_s": round(latencies[len(latencies) // 2], 2),
               "latency_p99_s": round(latencies[int(len(latencies) * 0.99)], 2),
               "latency_max_s": round(latencies[-1], 2), "over_120_s": sum(t > 120 for t in latencies)}
    report("load", **figures)
    assert not failures, failures[:10]
    assert all(done[k] for k in KINDS), done
    assert not leak_problems(info) and info["scheduler"]["num_sessions"] == 0, info
    assert latencies[-1] < STALL_S
