"""Server lifecycle: 503 while loading, clients that disconnect mid-request, a worker killed with
SIGKILL (the server exits non-zero, nothing left), SIGTERM (everything gone within 10 s)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from reliability_util import error_shape_problem, http_bytes, raw_exchange
from server_fixture import MODEL, RadixServer, http_request

LONG = {"max_new_tokens": 256, "ignore_eos": True, "temperature": 0}


def _send(port: int, path: str, body: dict) -> socket.socket:
    """Send a request on a raw socket (the test decides when the client goes away)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _first_event(sock: socket.socket) -> None:
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the first event: {received!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]


def _aborted_stream_end(server: RadixServer, path: str, body: dict) -> dict:
    """Stream `body` (whose rid is body["rid"]), abort it by rid after its first event; the last event's JSON."""
    sock = _send(server.port, path, body)
    _first_event(sock)
    assert server.post("/abort_request", {"rid": body["rid"]}).json() == {"aborted": 1}
    events = []
    with sock.makefile("rb") as stream:
        while not events or events[-1] != b"data: [DONE]\n":
            line = stream.readline()
            assert line, "the stream ended without [DONE]"
            if line.startswith(b"data: "):
                events.append(line)
    sock.close()
    return json.loads(events[-2][6:])


def _scheduler(server: RadixServer) -> dict:
    return server.get("/get_server_info").json()["scheduler"]


def _wait_idle(server: RadixServer, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = _scheduler(server)
        if info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0 or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def test_disconnects_abort_then_sigterm() -> None:
    server = RadixServer()
    try:
        socks = [_send(server.port, "/generate", {"text": f"Story {i}:", "sampling_params": LONG, "stream": True})
                 for i in range(4)]
        socks += [_send(server.port, "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 256,
            "ignore_eos": True, "temperature": 0, "stream": True}) for i in range(4)]
        for s in socks:
            _first_event(s)
        assert _scheduler(server)["num_running_reqs"] == 8
        for s in socks:
            s.close()
        info = _wait_idle(server, 2.0)
        assert info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0, info
        assert info["invariants"] == "ok" and info["aborted_requests"] >= 8

        # /abort_request ends a request by rid; its client sees finish_reason "abort" (SGLang's, on both APIs).
        last = _aborted_stream_end(server, "/generate", {"text": "Abort me:", "sampling_params": LONG,
                                                         "stream": True, "rid": "abort-me"})
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        last = _aborted_stream_end(server, "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "Abort me"}], "max_tokens": 256,
            "ignore_eos": True, "temperature": 0, "stream": True, "rid": "abort-me"})
        assert last["choices"][0]["finish_reason"] == "abort" and last["choices"][0]["matched_stop"] is None

        # A non-streaming client that leaves is aborted too.
        sock = _send(server.port, "/generate", {"text": "A long story:", "sampling_params": LONG})
        deadline = time.monotonic() + 30
        while _scheduler(server)["num_running_reqs"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        sock.close()
        info = _wait_idle(server, 2.0)
        assert info["num_running_reqs"] == 0 and info["invariants"] == "ok", info
        assert server.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 200
    finally:
        code, left = server.stop()
    assert code == 0, server.log()
    assert not left, f"processes left 10 s after SIGTERM: {left}"


def test_a_body_that_does_not_arrive_gets_a_408() -> None:
    """A client that sends headers and then too little of its body is answered 408 in the API's shape after
    --request-body-timeout (it holds no connection forever); the server goes on serving."""
    server = RadixServer("--request-body-timeout", "1")
    try:
        head = http_bytes("POST", "/v1/completions", headers={"Content-Length": "100"})
        started = time.monotonic()
        status, headers, body = raw_exchange(server.port, head + b'{"model": ', timeout=30)
        waited = time.monotonic() - started
        assert status == 408 and error_shape_problem(status, headers["content-type"], body) is None, body
        assert 0.9 < waited < 10, waited
        assert b"did not arrive within 1 s" in body
        resp = server.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
        assert resp.status_code == 200, resp.text
        server.stop_cleanly()
    finally:
        server.kill()


def test_503_while_loading_then_worker_killed() -> None:
    server = RadixServer(wait=False)
    try:
        first = None
        deadline = time.monotonic() + 60
        while first is None and time.monotonic() < deadline:
            try:
                first = http_request(server.port, "GET", "/health")
            except OSError:
                time.sleep(0.1)
        assert first is not None and first.status_code == 503, first
        assert first.json()["error"]["code"] == "service_unavailable"
        server.wait_ready()

        worker = server.get("/get_server_info").json()["processes"]["worker-0"]
        os.kill(worker, signal.SIGKILL)
        code = server.wait_exit(10)
        assert code not in (None, 0), f"exit code {code} after the worker was killed"
        assert "worker-0" in server.log() and "stopping the server" in server.log()
        assert not server.leftovers(1.0)
    finally:
        server.kill()
