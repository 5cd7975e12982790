"""Faults: kill -9 of each kind of child (tokenizer, scheduler, worker) under traffic stops the server with a
non-zero exit and no process left, and every client gets an answer (an error event, an error in the API's shape,
or a closed connection) instead of a hang; kill -9 of the launcher leaves no process, and the next start removes
the ipc directory it left; SIGTERM under traffic exits 0 with no process left and no client left hanging."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from reliability_util import error_shape_problem, report
from server_fixture import RadixServer, alive, descendants

CLIENTS = 6
CLIENT_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 15.0


class Client(threading.Thread):
    """One request on a raw socket, read to its end; `outcome` says how it ended."""

    def __init__(self, port: int, i: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stream = port, i % 3 != 0
        self.body = json.dumps({"text": f"Story {i}:", "stream": self.stream,
                                "sampling_params": {"max_new_tokens": 24, "ignore_eos": True}}).encode()
        self.started = threading.Event()  # the request is in (its first event came, or it was sent)
        self.outcome = "hang"

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT_S) as sock:
                sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body)
                if not self.stream:
                    self.started.set()
                raw = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    raw += chunk
                    if b"data: " in raw:
                        self.started.set()
                    if self._complete(raw):
                        break
                self.outcome = self._judge(raw)
        except TimeoutError:
            self.outcome = "hang"
        except OSError:
            self.outcome = "closed"
        finally:
            self.started.set()

    @staticmethod
    def _complete(raw: bytes) -> bool:
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            return False
        if b"text/event-stream" in head:
            return b"data: [DONE]" in body
        length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:")]
        return bool(length) and len(body) >= length[0]

    @staticmethod
    def _judge(raw: bytes) -> str:
        head, _, body = raw.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 "):
            return "closed"
        status = int(head.split()[1])
        if status >= 400:
            content_type = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                                 if line.lower().startswith(b"content-type:")), "")
            return "error" if error_shape_problem(status, content_type, body) is None else f"bad error {raw[:300]!r}"
        if b"text/event-stream" not in head:
            return "completed" if Client._complete(raw) else "closed"
        if b'data: {"error"' in body:
            return "error event"
        return "completed" if b"data: [DONE]" in body else "closed"


def _traffic(server: RadixServer) -> list[Client]:
    clients = [Client(server.port, i) for i in range(CLIENTS)]
    for c in clients:
        c.start()
    for c in clients:
        assert c.started.wait(CLIENT_TIMEOUT_S), "a request never started"
    return clients


def _outcomes(clients: list[Client]) -> dict[str, int]:
    for c in clients:
        c.join(CLIENT_TIMEOUT_S)
    counts: dict[str, int] = {}
    for c in clients:
        counts[c.outcome] = counts.get(c.outcome, 0) + 1
    return counts


def _acceptable(counts: dict[str, int]) -> bool:
    return set(counts) <= {"completed", "error", "error event", "closed"}


# make test kills the scheduler and a worker; a tokenizer, ended by the same supervisor path, in the long run
@pytest.mark.parametrize("victim", [pytest.param("tokenizer-0", marks=pytest.mark.long), "scheduler", "worker-0"])
def test_kill_a_child(victim: str) -> None:
    server = RadixServer()
    try:
        pid = server.get("/get_server_info").json()["processes"][victim]
        clients = _traffic(server)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        code = server.wait_exit(EXIT_TIMEOUT_S)
        exit_s = time.monotonic() - killed
        counts = _outcomes(clients)
        left = server.leftovers(2.0)
        report("kill_child", victim=victim, exit_code=code, exit_s=round(exit_s, 2), clients=counts, left=left)
        assert code not in (None, 0), f"exit code {code} after {victim} was killed\n{server.log()}"
        assert _acceptable(counts), counts
        assert not left, f"processes left: {left}"
    finally:
        server.kill()


def _ipc_dir_of(pid: int) -> Path:
    for owner in Path(tempfile.gettempdir()).glob("radixserve-*/owner"):
        if owner.read_text().split()[0] == str(pid):
            return owner.parent
    raise AssertionError(f"no ipc directory owned by {pid}")


def test_kill_the_launcher_then_restart_and_sigterm_under_traffic() -> None:
    server = RadixServer()
    try:
        ipc_dir = _ipc_dir_of(server.proc.pid)
        children = descendants(server.proc.pid)
        killed = time.monotonic()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(EXIT_TIMEOUT_S)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans_gone_s = time.monotonic() - killed
        assert not [p for p in children if alive(p)], "children outlived the launcher"
        assert ipc_dir.is_dir(), "a killed launcher cannot clean up: its ipc directory stays until the next start"
    finally:
        server.kill()

    nxt = RadixServer()
    try:
        assert not ipc_dir.exists(), "the next start did not remove the dead launcher's ipc directory"
        clients = _traffic(nxt)
        signalled = time.monotonic()
        nxt.proc.send_signal(signal.SIGTERM)
        code = nxt.wait_exit(60)
        exit_s = time.monotonic() - signalled
        counts = _outcomes(clients)
        left = nxt.leftovers(2.0)
        own_dir = [d for d in Path(tempfile.gettempdir()).glob("radixserve-*/owner")
                   if d.read_text().split()[0] == str(nxt.proc.pid)]
        report("kill_launcher_then_sigterm", children_gone_s=round(orphans_gone_s, 2), sigterm_exit_code=code,
               sigterm_exit_s=round(exit_s, 2), clients=counts, left=left)
        assert code == 0, nxt.log()
        assert _acceptable(counts), counts
        assert not left and not own_dir
    finally:
        nxt.kill()
