"""The HTTP layer without a model: errors nobody planned for answer 500 in the API's shape with a logged traceback
(raised in a route, or past every middleware), and a request whose send fails leaves nothing pending. A small
aiohttp app runs on loopback with the gateway's ApiAppRunner; the TokenizerClient uses real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web
from reliability_util import error_shape_problem, http_bytes, raw_exchange
from server_fixture import free_port

from radixserve import wire
from radixserve.errors import ApiError
from radixserve.gateway import http_errors
from radixserve.gateway.tokenizer_client import TokenizerClient
from radixserve.ipc import IpcPaths


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("a bug")


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="OK")


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    """Two apps on loopback: one with the gateway's error middleware, one with none (errors reach aiohttp)."""
    loop = asyncio.new_event_loop()
    runners, ports = [], (free_port(), free_port())

    async def start() -> None:
        for port, middlewares in zip(ports, ([http_errors.middleware(1024)], []), strict=True):
            app = web.Application(middlewares=middlewares)
            app.router.add_get("/boom", _boom)
            app.router.add_get("/ok", _ok)
            runner = http_errors.ApiAppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield ports
    for runner in runners:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.mark.parametrize("which", ["in a route", "past every middleware"])
def test_unexpected_error_is_a_500_in_shape(ports: tuple[int, int], which: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    port = ports[0] if which == "in a route" else ports[1]
    with caplog.at_level(logging.ERROR):
        status, headers, body = raw_exchange(port, http_bytes("GET", "/boom"))
    assert status == 500
    assert error_shape_problem(status, headers.get("content-type", ""), body) is None, body
    assert b"a bug" not in body  # the traceback goes to the log, not to the client
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records), caplog.text
    assert raw_exchange(port, http_bytes("GET", "/ok"))[0] == 200


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (http_bytes("GET", "/ok", headers={"X-Big": "a" * 20000}), 431),
    (b"BREW /ok HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (http_bytes("POST", "/ok", b"{}", {"Content-Encoding": "br"}), 415),
    (b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n", 400),
])
def test_parser_errors_in_shape_on_a_bare_app(ports: tuple[int, int], request_bytes: bytes, status: int) -> None:
    """ApiAppRunner alone (no middleware) answers parser errors in the API's shape."""
    got, headers, body = raw_exchange(ports[1], request_bytes)
    assert got == status and error_shape_problem(got, headers.get("content-type", ""), body) is None, body


def test_a_failed_send_leaves_nothing_pending() -> None:
    ipc = IpcPaths.create()
    client = TokenizerClient(ipc, num_tokenizers=2, max_pending=8)
    try:
        client.close()  # every socket gone: each send fails
        reqs = [wire.GenerateText(rid=f"r{i}", text="hi") for i in range(3)]
        with pytest.raises(ApiError) as e:
            client.submit(reqs)
        assert e.value.status == 503 and client.num_pending == 0

        async def call() -> None:
            with pytest.raises(ApiError) as e:
                await client.control(wire.FlushCache, timeout=5)
            assert e.value.status == 503

        asyncio.run(call())
    finally:
        shutil.rmtree(ipc.root, ignore_errors=True)
