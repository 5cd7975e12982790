"""Stopping on SIGTERM with a real server: the drain (no new work, health routes 503, requests in flight
finish, or end with finish reason `abort` past --shutdown-timeout; exit 0, no process left), and systemd's
notifications (READY=1, WATCHDOG=1 pings, STOPPING=1) sent to a notify socket the test binds."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from pathlib import Path

from server_fixture import MODEL, RadixServer, http_request

KEY = "drain-test-key"
LONG = {"max_new_tokens": 1900, "ignore_eos": True, "temperature": 0}  # minutes on a CPU: never done in a test


class Stream:
    """A streamed /generate read event by event, so the test acts between them."""

    def __init__(self, server: RadixServer, sampling: dict, **body: object) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        self.conn.request("POST", "/generate", json.dumps({"text": "Once upon a time", "sampling_params": sampling,
                                                           "stream": True, **body}),
                          {"Content-Type": "application/json", **server.headers})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        self.events: list[dict] = []
        self.done = False

    def next(self) -> dict | None:
        """The next event, or None after [DONE]."""
        while line := self.resp.readline():
            if line == b"data: [DONE]\n":
                self.done = True
                return None
            if line.startswith(b"data: "):
                self.events.append(json.loads(line[6:]))
                return self.events[-1]
        raise AssertionError(f"the stream ended without [DONE] after {len(self.events)} events")

    def rest(self) -> list[dict]:
        while self.next() is not None:
            pass
        self.conn.close()
        return self.events


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def refused(server: RadixServer, method: str, path: str, body: dict | None = None) -> dict:
    """The 503 a draining server answers, in OpenAI's error shape."""
    resp = http_request(server.port, method, path, json.dumps(body).encode() if body is not None else None,
                        {"Content-Type": "application/json", **server.headers})
    assert resp.status_code == 503, (path, resp.status_code, resp.text)
    error = resp.json()["error"]
    assert error["code"] == "service_unavailable" and "shutting down" in error["message"]
    return error


def exited_cleanly(server: RadixServer, timeout: float) -> None:
    code = server.wait_exit(timeout)
    left = server.leftovers(1.0)
    server.kill()
    assert code == 0, f"exit code {code}\n{server.log()}"
    assert not left, f"processes left: {left}"


def test_a_stream_in_flight_finishes_across_sigterm() -> None:
    server = RadixServer("--metrics-public", api_key=KEY)
    try:
        short = Stream(server, {"max_new_tokens": 32, "ignore_eos": True, "temperature": 0})
        long = Stream(server, LONG, rid="long")  # keeps the server draining while the test looks at it
        assert short.next() is not None and long.next() is not None
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: http_request(server.port, "GET", "/health").status_code == 503, 5, "/health turns 503")
        refused(server, "GET", "/health")
        refused(server, "GET", "/health_generate")
        refused(server, "POST", "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
        refused(server, "POST", "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
        metrics = http_request(server.port, "GET", "/metrics")  # public, and readable while draining
        assert metrics.status_code == 200 and f'radixserve:num_requests_total{{model_name="{MODEL}"}}' in metrics.text

        last = short.rest()[-1]["meta_info"]
        assert last["finish_reason"] == {"type": "length", "length": 32} and last["completion_tokens"] == 32
        assert server.proc.poll() is None  # "long" is still in flight
        assert server.post("/abort_request", {"rid": "long"}).json() == {"aborted": 1}  # aborts are still taken
        assert long.rest()[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        exited_cleanly(server, 10)
    finally:
        server.kill()


def test_past_the_shutdown_timeout_requests_are_aborted() -> None:
    server = RadixServer("--shutdown-timeout", "1")
    try:
        streamed = Stream(server, LONG)
        assert streamed.next() is not None
        unstreamed: list = []  # a non-streamed request in flight: answered with what it has, finish reason abort
        thread = threading.Thread(target=lambda: unstreamed.append(server.post("/generate", {
            "text": "A long story:", "sampling_params": LONG})))
        thread.start()
        wait_for(lambda: server.get("/get_server_info").json()["scheduler"]["num_running_reqs"] == 2, 30,
                 "both requests run")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        events = streamed.rest()
        aborted_after = time.monotonic() - signalled
        thread.join(10)
        finish = events[-1]["meta_info"]["finish_reason"]
        assert finish["type"] == "abort" and "--shutdown-timeout 1 s" in finish["message"], finish
        assert 1.0 <= aborted_after < 6.0, aborted_after
        assert 0 < events[-1]["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]
        assert unstreamed[0].status_code == 200 and unstreamed[0].json()["meta_info"]["finish_reason"] == finish
        exited_cleanly(server, 10)
    finally:
        server.kill()


def test_systemd_notifications_and_a_second_sigterm(tmp_path: Path) -> None:
    """Under a fake systemd: READY=1 once ready, WATCHDOG=1 every WatchdogSec/2, STOPPING=1 on SIGTERM; a second
    SIGTERM stops the drain at once (the stream in flight gets an error event)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.1)
    states: list[tuple[float, str]] = []  # (when it arrived, what), read as they come by a thread
    listening = threading.Event()
    listening.set()

    def receive() -> None:
        while listening.is_set():
            try:
                states.append((time.monotonic(), sock.recv(4096).decode()))
            except TimeoutError:
                pass

    def sent(prefix: str) -> list[tuple[float, str]]:
        return [(t, s) for t, s in list(states) if s.startswith(prefix)]

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": ""}
    server = RadixServer("--disable-metrics", env=env)
    try:
        assert server.get("/metrics").status_code == 404
        time.sleep(3.0)  # pings every WatchdogSec / 2 = 1 s
        ready, pings = sent("READY=1"), [t for t, _ in sent("WATCHDOG=1")]
        assert len(ready) == 1 and "STATUS=serving" in ready[0][1], states
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert len(pings) >= 3 and 0.5 < min(gaps) and max(gaps) < 2.0, states  # within WatchdogSec, not spamming
        assert not sent("STOPPING")

        stream = Stream(server, LONG)
        assert stream.next() is not None
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: sent("STOPPING"), 5, "STOPPING=1")
        assert [s for _, s in sent("STOPPING")] == ["STOPPING=1"], states
        assert server.proc.poll() is None  # draining: the stream has up to 30 s
        stopped = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        events = stream.rest()
        assert events[-1]["error"]["code"] == "service_unavailable", events[-1]
        exited_cleanly(server, 10)
        assert time.monotonic() - stopped < 10
    finally:
        listening.clear()
        receiver.join()
        sock.close()
        server.kill()
