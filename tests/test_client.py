"""radixserve.client against a real server (started here, with an API key): the seed's client and
session-manager cases, plus error types. A tiny aiohttp app stands in only for failures a real
server does not produce on demand (a 500, a cut stream, an error event, a hang)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from server_fixture import START_TIMEOUT_S, RadixServer, free_port

from radixserve.client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    AsyncSessionManager,
    Client,
    HealthStatus,
    SessionManager,
    SessionNotFoundError,
    StreamError,
)

KEY = "client-test-key"
GREEDY = {"max_new_tokens": 8, "temperature": 0}
CHAT = {"max_tokens": 8, "temperature": 0}


@dataclass
class Started:
    server: RadixServer
    health_while_loading: HealthStatus
    ready_in: float


@pytest.fixture(scope="module")
def started() -> Iterator[Started]:
    """A server made ready by the client's own wait_for_ready (not the fixture's)."""
    srv = RadixServer("--max-running-requests", "8", api_key=KEY, wait=False)
    try:
        with Client(srv.url, api_key=KEY) as client:
            loading = client.health_check()
            start = time.monotonic()
            client.wait_for_ready(timeout=START_TIMEOUT_S)
            ready_in = time.monotonic() - start
        srv.wait_ready()  # records its processes for stop()
    except Exception as e:
        log = srv.log()
        srv.kill()
        raise RuntimeError(f"server did not start:\n{log}") from e
    yield Started(srv, loading, ready_in)
    srv.stop_cleanly()


@pytest.fixture(scope="module")
def server(started: Started) -> RadixServer:
    return started.server


@pytest.fixture(scope="module")
def client(server: RadixServer) -> Iterator[Client]:
    with Client(server.url, timeout=120, api_key=KEY) as c:
        yield c


def num_sessions(client: Client) -> int:
    return client.server_info()["scheduler"]["num_sessions"]


# ---------------------------------------------------------------- Client


def test_client_generate(client: Client) -> None:
    out = client.generate("The capital of France is", GREEDY)
    assert out["text"] and len(out["output_ids"]) == out["meta_info"]["completion_tokens"] == 8
    batch = client.generate(["The capital of France is", "1, 2, 3,"], GREEDY)
    assert [b["text"] for b in batch][0] == out["text"]
    ids = client.generate(input_ids=out["output_ids"][:3], sampling_params={"max_new_tokens": 0})
    assert ids["meta_info"]["prompt_tokens"] == 3 and ids["text"] == ""
    with pytest.raises(APIStatusError) as bad:
        client.generate("x", {"temperature": -1})
    assert bad.value.status == 400 and bad.value.param == "sampling_params.temperature"
    assert bad.value.type == "invalid_request_error" and "temperature" in bad.value.message
    assert '"error"' in bad.value.body


def test_client_api_key(server: RadixServer) -> None:
    with Client(server.url) as anonymous, pytest.raises(APIStatusError) as denied:
        anonymous.generate("x", GREEDY)
    assert denied.value.status == 401 and denied.value.code == "invalid_api_key"


def test_client_chat(client: Client) -> None:
    reply = client.chat([{"role": "user", "content": "Name three colors."}], **CHAT)
    assert reply["model"] == "SmolLM2-135M-Instruct" and reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] <= 8


def test_client_generate_stream(client: Client) -> None:
    full = client.generate("Once upon a time", GREEDY)
    events = list(client.generate_stream("Once upon a time", GREEDY))
    assert len(events) > 1 and events[-1]["text"] == full["text"]
    assert all(events[i + 1]["text"].startswith(events[i]["text"]) for i in range(len(events) - 1))
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    with pytest.raises(APIStatusError) as bad:  # rejected before the stream starts: a 4xx, raised
        next(client.generate_stream("x", {"top_p": 0}))
    assert bad.value.status == 400
    stream = client.generate_stream("Count: 1, 2, 3,", {"max_new_tokens": 200, "ignore_eos": True})
    next(stream)
    stream.close()  # leaving early disconnects, and the server aborts the request
    deadline = time.monotonic() + 30
    while client.server_info()["scheduler"]["num_running_reqs"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.server_info()["scheduler"]["num_running_reqs"] == 0


def test_client_health_check(started: Started, client: Client) -> None:
    loading = started.health_while_loading
    assert not loading.available and loading.error  # refused, or 503 while loading
    status = client.health_check()
    assert status.available and status.error is None and 0 < status.latency < 5
    assert status.queue_length == 0 and 0 <= status.kv_usage <= 1
    assert status.gpu_memory_used is None and status.gpu_memory_free is None  # a CPU server
    with Client(f"http://127.0.0.1:{free_port()}") as nobody:
        down = nobody.health_check()
    assert not down.available and down.latency is None and "Cannot connect" in down.error


def test_client_wait_for_ready(started: Started, client: Client) -> None:
    assert started.ready_in > 0
    start = time.monotonic()
    client.wait_for_ready(timeout=30)
    assert time.monotonic() - start < 10
    with Client(f"http://127.0.0.1:{free_port()}") as nobody:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="not ready within 1"):
            nobody.wait_for_ready(timeout=1, interval=0.1)
        assert 0.9 < time.monotonic() - start < 3


def test_client_inside_a_running_loop(client: Client) -> None:
    async def notebook_cell() -> str:  # as in Jupyter: a loop is already running in this thread
        return client.generate("Hello", GREEDY)["text"]

    assert asyncio.run(notebook_cell())


def test_async_client_concurrent(server: RadixServer) -> None:
    async def main() -> list[dict]:
        async with AsyncClient(server.url, api_key=KEY, max_connections=2) as aclient:
            return await asyncio.gather(*(aclient.generate(f"{i} + {i} =", GREEDY) for i in range(4)))

    outs = asyncio.run(main())
    assert len({o["meta_info"]["id"] for o in outs}) == 4 and all(o["text"] for o in outs)


def test_client_connection_errors() -> None:
    with Client(f"http://127.0.0.1:{free_port()}") as nobody:
        with pytest.raises(APIConnectionError, match="Cannot connect"):
            nobody.generate("x")
        with pytest.raises(APIConnectionError):
            next(nobody.generate_stream("x"))
    closed = Client()
    closed.close()
    with pytest.raises(Exception, match="closed"):
        closed.health_check()


def run_against(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                test: Callable[[AsyncClient], Awaitable[None]], timeout: float = 5) -> None:
    """`test(client)` against a one-route app that answers POST /generate with `handler`."""

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/generate", handler)
        async with TestServer(app) as srv, AsyncClient(str(srv.make_url("")), timeout=timeout) as aclient:
            await test(aclient)

    asyncio.run(main())


async def sse(request: web.Request, *events: bytes) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for event in events:
        await resp.write(event)
    return resp


def test_client_server_failures() -> None:
    async def collect(aclient: AsyncClient) -> list[dict]:
        return [e async for e in aclient.generate_stream("x")]

    async def expect_stream_error(aclient: AsyncClient, match: str) -> StreamError:
        with pytest.raises(StreamError, match=match) as err:
            await collect(aclient)
        return err.value

    async def no_done(request: web.Request) -> web.StreamResponse:
        return await sse(request, b'data: {"text": "a"}\n\n')

    run_against(no_done, lambda c: expect_stream_error(c, "ended before data: \\[DONE\\]"))

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = await sse(request, b'data: {"text": "a"}\n\n')
        request.transport.close()
        return resp

    run_against(cut, lambda c: expect_stream_error(c, "cut|ended before"))

    async def error_event(request: web.Request) -> web.StreamResponse:
        return await sse(request, b'data: {"text": "a"}\n\ndata: {"error": {"message": "KV cache exhausted", '
                                  b'"type": "server_error", "code": 503}}\n\ndata: [DONE]\n\n')

    async def check_error_event(aclient: AsyncClient) -> None:
        err = await expect_stream_error(aclient, "KV cache exhausted")
        assert err.error == {"message": "KV cache exhausted", "type": "server_error", "code": 503}

    run_against(error_event, check_error_event)

    async def split_events(request: web.Request) -> web.StreamResponse:  # events split across writes
        return await sse(request, b'data: {"text"', b': "a"}\n\nda', b'ta: {"text": "ab"}\n', b"\ndata: [DONE]\n\n")

    async def check_split(aclient: AsyncClient) -> None:
        assert [e["text"] for e in await collect(aclient)] == ["a", "ab"]

    run_against(split_events, check_split)

    async def internal_error(request: web.Request) -> web.Response:
        return web.Response(status=500, text="Internal Server Error")

    async def check_500(aclient: AsyncClient) -> None:
        with pytest.raises(APIStatusError) as err:
            await aclient.generate("x")
        assert err.value.status == 500 and err.value.message == "Internal Server Error" and err.value.code is None

    run_against(internal_error, check_500)

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(text="late")

    async def check_timeout(aclient: AsyncClient) -> None:
        start = time.monotonic()
        with pytest.raises(APITimeoutError):
            await aclient.generate("x")
        with pytest.raises(APITimeoutError):
            await collect(aclient)
        assert time.monotonic() - start < 3

    run_against(hang, check_timeout, timeout=0.5)


# ---------------------------------------------------------------- SessionManager


@pytest.fixture
def sessions(client: Client) -> Iterator[SessionManager]:
    with SessionManager(client) as manager:
        yield manager


def test_session_manager_create_session(client: Client, sessions: SessionManager) -> None:
    before = num_sessions(client)
    session = sessions.create_session()
    assert session.id == session.server_session_id and session.turns == ()
    named = sessions.create_session("alice")
    assert named.id == "alice" and named.server_session_id != session.server_session_id
    assert sessions.get_session("alice") == named and sorted(sessions.session_ids()) == sorted([session.id, "alice"])
    assert num_sessions(client) == before + 2
    with pytest.raises(ValueError, match="already exists"):
        sessions.create_session("alice")
    assert num_sessions(client) == before + 2  # the server session opened for the duplicate was closed
    with pytest.raises(SessionNotFoundError):
        sessions.get_session("bob")


@pytest.mark.parametrize("mode", ["chat", "text"])
def test_session_manager_generate(client: Client, mode: str) -> None:
    options = CHAT if mode == "chat" else GREEDY
    with SessionManager(client, mode=mode) as sessions:
        sid = sessions.create_session().id
        turns = [sessions.generate(sid, prompt, **options)
                 for prompt in ("My name is Ada.", " What is my name?", " Say it again.")]
        assert sessions.get_session(sid).turns == tuple(turns)
        for prev, turn in pairwise(turns):
            assert turn.rid != prev.rid
            assert turn.prompt_tokens > prev.prompt_tokens + prev.completion_tokens
            assert turn.cached_tokens >= prev.prompt_tokens + prev.completion_tokens - 1
        with pytest.raises(ValueError, match="one answer"):
            sessions.generate(sid, "x", n=2)
        with pytest.raises(SessionNotFoundError):
            sessions.generate("nobody", "x")


def test_session_manager_fork_session(client: Client, sessions: SessionManager) -> None:
    sid = sessions.create_session().id
    first = sessions.generate(sid, "Tell me a story about a robot.", **CHAT)
    fork = sessions.fork_session(sid, "fork")
    assert fork.server_session_id == sessions.get_session(sid).server_session_id and fork.turns == (first,)
    history = first.prompt_tokens + first.completion_tokens
    a = sessions.generate(sid, "Make it sad.", **CHAT)
    b = sessions.generate("fork", "Make it happy.", **CHAT)
    assert a.cached_tokens >= history - 1 and b.cached_tokens >= history - 1
    assert sessions.get_session(sid).turns == (first, a) and sessions.get_session("fork").turns == (first, b)
    with pytest.raises(ValueError, match="already exists"):
        sessions.fork_session(sid, "fork")


def test_session_manager_delete_session(client: Client, sessions: SessionManager) -> None:
    before = num_sessions(client)
    sid = sessions.create_session().id
    sessions.generate(sid, "Hi!", **CHAT)
    sessions.fork_session(sid, "fork")
    sessions.delete_session(sid)
    assert num_sessions(client) == before + 1  # the fork still uses the server session
    assert sessions.generate("fork", "Bye!", **CHAT).text
    sessions.delete_session("fork")
    assert num_sessions(client) == before
    for gone in (sid, "fork"):
        with pytest.raises(SessionNotFoundError):
            sessions.delete_session(gone)
        with pytest.raises(SessionNotFoundError):
            sessions.generate(gone, "x")


def test_session_manager_concurrent(server: RadixServer) -> None:
    """Turns of one session queue up behind each other; separate sessions run side by side."""

    async def main() -> None:
        async with AsyncClient(server.url, api_key=KEY) as aclient, AsyncSessionManager(aclient) as manager:
            one, two = (await manager.create_session()).id, (await manager.create_session()).id
            deleting = await manager.create_session()
            turns = await asyncio.gather(*(manager.generate(one, f"Fact {k}?", **CHAT) for k in range(3)),
                                         manager.generate(two, "Hello!", **CHAT))
            chain = manager.get_session(one).turns
            assert sorted(chain, key=lambda t: t.prompt_tokens) == list(chain) and set(chain) == set(turns[:3])
            running = asyncio.ensure_future(manager.generate(deleting.id, "Hello!", **CHAT))
            await asyncio.sleep(0)  # the turn has the session's lock: deletion waits for it
            await manager.delete_session(deleting.id)
            assert (await running).text

    asyncio.run(main())


def test_session_errors_from_the_server(client: Client) -> None:
    with pytest.raises(APIStatusError) as unknown:
        client.generate("x", GREEDY, session_params={"id": "no-such-session"})
    assert unknown.value.status == 400 and "no-such-session" in unknown.value.message
    sid = client.open_session()
    with pytest.raises(APIStatusError) as no_turn:
        client.chat([{"role": "user", "content": "x"}], session_params={"id": sid, "rid": "no-such-turn"}, **CHAT)
    assert no_turn.value.status == 400
    running = client.generate_stream("Count: 1, 2,", {"max_new_tokens": 64, "ignore_eos": True}, rid="running-turn",
                                     session_params={"id": sid})
    next(running)
    with pytest.raises(APIStatusError) as busy:
        client.generate("x", GREEDY, session_params={"id": sid, "rid": "running-turn"})
    assert busy.value.status == 409
    running.close()
    client.close_session(sid)
    with pytest.raises(APIStatusError):
        client.close_session(sid)
