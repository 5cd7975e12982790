"""`python -m radixserve serve` in a subprocess on a free port of 127.0.0.1, its output in a log file, polled until
/health_generate answers: the server `bench serve --launch-server` measures, and the one the HTTP tests start
(tests/server_fixture.py)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"
POLL_S = 0.25
LOG_TAIL_CHARS = 4000  # of a server that failed to start, in the error


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid`, from /proc (children of every thread)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick of an ephemeral one)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """The server, started with `flags` (but --host and --port); `env` replaces this process' environment and
    `cwd` its directory. The log is `$TMPDIR/{log_name}-{port}.log`."""

    def __init__(self, flags: Sequence[str], log_name: str = "radixserve", env: dict[str, str] | None = None,
                 cwd: str | Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = Path(tempfile.gettempdir()) / f"{log_name}-{self.port}.log"
        self.cmd = [sys.executable, "-m", "radixserve", "serve", "--host", HOST, "--port", str(self.port), *flags]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        """Poll /health_generate (a public route) until it answers 200. RuntimeError if the server exits first
        or answers anything but 503 (still loading), TimeoutError after `timeout` seconds; both end with the end
        of its log. The server is left as it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}; its log "
                                   f"({self.log_path}) ends:\n{self.log()}")
            status = self._health(max(1.0, deadline - time.monotonic()))
            if status == 200:
                return
            if status not in (None, 503):
                raise RuntimeError(f"the server's /health_generate answered {status}; its log ({self.log_path}) "
                                   f"ends:\n{self.log()}")
            time.sleep(POLL_S)
        raise TimeoutError(f"the server was not ready within {timeout:g} s; its log ({self.log_path}) ends:\n"
                           f"{self.log()}")

    def _health(self, timeout: float) -> int | None:
        """The status of GET /health_generate, or None if nothing answers yet."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=min(timeout, 60.0))
        try:
            conn.request("GET", "/health_generate")
            return conn.getresponse().status
        except OSError:
            return None
        finally:
            conn.close()

    def log(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the server's output."""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - chars))
            return f.read().decode(errors="replace")

    def terminate(self, timeout: float) -> int:
        """SIGTERM (the server drains and stops its children), SIGKILL after `timeout` seconds; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()
