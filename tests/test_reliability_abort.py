"""Aborts and disconnects: requests cut at random points (before the request is whole, before the response,
during prefill, mid-stream, while queued, non-streamed), aborts by rid and abort_all, all concurrently. Each
ends as completed, aborted or rejected; afterwards nothing is pending in the gateway, no request runs or
waits, no KV is held, the scheduler's invariants hold, a flush empties the pool, and the reference greedy
request answers as before."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time

import pytest
from reliability_util import (
    flush_empties_pool,
    http_bytes,
    leak_problems,
    open_request,
    reference_ids,
    report,
    server_info,
    size,
    wait_idle,
)
from server_fixture import RadixServer

CUTS = size(ci=80, long=1000)
MAX_RUNNING = 8
CONCURRENCY = 16  # past MAX_RUNNING: some requests wait in the queue when they are cut
LONG_PROMPT = "Tell me everything about the history of the Roman Empire. " * 60  # ~700 tokens: a long prefill
READ_TIMEOUT_S = float(size(ci=120, long=600))  # a completed request may wait behind the others on 2 shared cores


pytestmark = pytest.mark.server_flags("--max-running-requests", str(MAX_RUNNING))


def _body(rng: random.Random, i: int, stream: bool) -> tuple[str, dict]:
    sampling = {"max_new_tokens": rng.choice([8, 32, 96]), "temperature": rng.choice([0, 0.8]), "ignore_eos": True}
    prompt = LONG_PROMPT if rng.random() < 0.3 else f"Request {i}: write a poem about the number {i}."
    if rng.random() < 0.5:
        return "/generate", {"text": prompt, "sampling_params": sampling, "stream": stream, "rid": f"cut-{i}"}
    return "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": prompt}],
                                    "max_tokens": sampling["max_new_tokens"], "stream": stream, "ignore_eos": True}


async def _read_until_done(reader: asyncio.StreamReader, raw: bytes = b"") -> bytes:
    """The rest of a response, raw (a stream, chunk-encoded, ends with [DONE]; a JSON body at its length)."""
    while b"\r\n\r\n" not in raw:
        raw += await _more(reader, raw)
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"text/event-stream" in head:
        while b"data: [DONE]" not in body:
            body += await _more(reader, raw + body)
    else:
        assert b"content-length:" in head.lower(), head
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += await _more(reader, raw + body)
    return head + b"\r\n\r\n" + body


async def _more(reader: asyncio.StreamReader, so_far: bytes) -> bytes:
    chunk = await reader.read(65536)
    if not chunk:
        raise ConnectionError(f"the response ended early: {so_far[-300:]!r}")
    return chunk


def _last_event(raw: bytes) -> dict:
    return json.loads([line for line in raw.split(b"\n") if line.startswith(b"data: {")][-1][6:])


async def _cut(port: int, rng: random.Random, i: int, outcomes: collections.Counter) -> None:
    kind = rng.choice(["partial body", "before response", "prefill", "mid-stream", "non-streamed", "by rid",
                       "completed"])
    stream = kind in ("mid-stream", "by rid") or (kind == "completed" and rng.random() < 0.5)
    path, body = _body(rng, i, stream)
    if kind == "by rid":
        path, body = "/generate", {"text": f"Abort me {i}:", "stream": True, "rid": f"by-rid-{i}",
                                   "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
    if kind == "partial body":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = http_bytes("POST", path, json.dumps(body).encode())
        writer.write(data[: rng.randrange(len(data) - 1)])
        await writer.drain()
        await asyncio.sleep(rng.uniform(0, 0.05))
        writer.close()
        outcomes[kind] += 1
        return
    reader, writer = await open_request(port, path, body)
    try:
        if kind == "before response":
            await asyncio.sleep(rng.uniform(0, 0.01))
        elif kind == "prefill":
            await asyncio.sleep(rng.uniform(0.0, 0.3))
        elif kind == "mid-stream":
            await reader.readuntil(b"\r\n\r\n")
            for _ in range(rng.randrange(1, 6)):
                await reader.readuntil(b"\n\n")
        elif kind == "non-streamed":
            await asyncio.sleep(rng.uniform(0.05, 1.5))
        elif kind == "by rid":
            first = await reader.readuntil(b"\n\n")  # running: its first event came
            loop = asyncio.get_running_loop()
            status = await loop.run_in_executor(None, _abort, port, body["rid"])
            raw = await asyncio.wait_for(_read_until_done(reader, first), READ_TIMEOUT_S)
            last = _last_event(raw)
            assert status == 200 and last["meta_info"]["finish_reason"]["type"] in ("abort", "length"), last
        else:
            raw = await asyncio.wait_for(_read_until_done(reader), READ_TIMEOUT_S)
            assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
        outcomes[kind] += 1
    finally:
        writer.close()


def _abort(port: int, rid: str) -> int:
    from server_fixture import http_request

    return http_request(port, "POST", "/abort_request", json.dumps({"rid": rid}).encode()).status_code


async def _run_cuts(port: int, n: int, seed: int) -> collections.Counter:
    rng = random.Random(seed)
    outcomes: collections.Counter = collections.Counter()
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with sem:
            await _cut(port, random.Random(rng.random()), i, outcomes)

    await asyncio.gather(*(one(i) for i in range(n)))
    return outcomes


def test_cut_requests_leave_nothing_behind(server: RadixServer) -> None:
    reference = reference_ids(server)
    started = time.monotonic()
    outcomes = asyncio.run(_run_cuts(server.port, CUTS, seed=15))
    cut_s = time.monotonic() - started
    info = wait_idle(server, timeout=60)
    problems = leak_problems(info)
    sched = info["scheduler"]
    report("abort_disconnect", requests=CUTS, by_kind=dict(outcomes), leaks=problems, seconds=round(cut_s, 1),
           aborted_in_scheduler=sched["aborted_requests"], finished=sched["finished_requests"])
    assert sum(outcomes.values()) == CUTS
    assert not problems, info
    assert sched["aborted_requests"] >= outcomes["mid-stream"]
    flush_empties_pool(server)
    assert reference_ids(server) == reference


async def _abort_all_round(port: int, n: int) -> list[bytes]:
    """`n` long streams; once all run or wait, abort_all; every client gets its stream's end."""
    conns = [await open_request(port, "/generate", {"text": f"Story {i}:", "stream": True,
                                                     "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}})
             for i in range(n)]
    first = await conns[0][0].readuntil(b"\n\n")  # the first one is running
    loop = asyncio.get_running_loop()
    resp = await loop.run_in_executor(None, lambda: json.loads(_post_abort_all(port)))
    assert resp["aborted"] >= 1, resp
    raws = []
    for i, (reader, writer) in enumerate(conns):
        raws.append(await asyncio.wait_for(_read_until_done(reader, first if i == 0 else b""), READ_TIMEOUT_S))
        writer.close()
    return raws


def _post_abort_all(port: int) -> bytes:
    from server_fixture import http_request

    return http_request(port, "POST", "/abort_request", b'{"abort_all": true}').content


def test_abort_all(server: RadixServer) -> None:
    raws = asyncio.run(_abort_all_round(server.port, MAX_RUNNING + 4))  # some run, some wait
    finishes = collections.Counter(_last_event(raw)["meta_info"]["finish_reason"]["type"] for raw in raws)
    assert finishes["abort"] >= MAX_RUNNING + 3, finishes  # the first may finish its 400 tokens before the abort lands
    info = wait_idle(server)
    assert not leak_problems(info), info
    assert server_info(server)["num_pending_http_reqs"] == 0
    flush_empties_pool(server)
