"""A real radixserve server in a subprocess, for the HTTP tests.

`RadixServer(*extra_flags)` starts `python -m radixserve serve` on a free port with small limits
(radixserve.bench.server_process, as `bench serve --launch-server` does), waits for /health_generate, and
`stop_cleanly()` SIGTERMs it and checks that no process of it is left. The `server` fixture of tests/conftest.py
gives each test module one.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from radixserve.bench.server_process import (  # noqa: F401 (free_port: for the tests)
    ServerProcess,
    descendants,
    free_port,
)

REPO = Path(__file__).resolve().parent.parent
SMALL_LIMITS = ["--max-total-tokens", "4096", "--max-running-requests", "16", "--context-length", "2048"]
# Test servers check the scheduler's KV invariants whenever it goes idle (/get_server_info reports the result),
# and compute in float32, where greedy tokens do not depend on batch composition (--dtype auto picks bfloat16 on
# CPUs with native bf16: tests/test_cpu_dtype.py covers that default).
DEBUG_FLAGS = ["--enable-invariant-checks", "--dtype", "float32"]
START_TIMEOUT_S = 240.0
MODEL = "SmolLM2-135M-Instruct"


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Response:
    status_code: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> object:
        return json.loads(self.content)


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60) -> Response:
    """One HTTP request to 127.0.0.1 (stdlib only)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def process_title(pid: int) -> bytes:
    """Its command line (renamed by setproctitle where installed) and kernel name (procutil.child_init)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() + b" " + Path(f"/proc/{pid}/comm").read_bytes()
    except OSError:
        return b""


class RadixServer(ServerProcess):
    def __init__(self, *flags: str, api_key: str | None = None, wait: bool = True,
                 env: dict[str, str] | None = None) -> None:
        self.api_key = api_key
        # The key is the test's choice; `env` adds to this process' environment (a name set to "" is left out).
        extra = env or {}
        env = {k: v for k, v in {**os.environ, **extra}.items() if k != "RADIXSERVE_API_KEY" and extra.get(k) != ""}
        super().__init__([*SMALL_LIMITS, *DEBUG_FLAGS, "--log-level", "warning", *flags,
                          *(["--api-key", api_key] if api_key else [])], "radixserve-test", env=env, cwd=REPO)
        self.child_pids: list[int] = []
        if wait:
            self.wait_ready()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait for /health_generate; on failure the server is killed and the error shows its log."""
        try:
            super().wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        self.child_pids = descendants(self.proc.pid)

    def post(self, path: str, body: object) -> Response:
        """POST `body` as JSON (bytes are sent as they are)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return http_request(self.port, "POST", path, data, {"Content-Type": "application/json", **self.headers})

    def get(self, path: str) -> Response:
        return http_request(self.port, "GET", path, headers=self.headers)

    def openai_client(self):  # -> openai.OpenAI (imported here: only the API tests need the package)
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused", max_retries=0, timeout=120)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def leftovers(self, timeout: float) -> list[int]:
        """Pids of the server and its children still alive after waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        pids = [self.proc.pid, *self.child_pids]
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        return [p for p in pids if alive(p)]

    def stop_cleanly(self) -> None:
        """SIGTERM; asserts the server exits 0 and leaves no process (the end of every module's server fixture)."""
        code, left = self.stop()
        assert code == 0 and not left, f"SIGTERM: exit code {code}, processes left {left}\n{self.log()}"

    def stop(self) -> tuple[int | None, list[int]]:
        """SIGTERM; returns (exit code, pids left after 10 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.wait_exit(10)
        left = self.leftovers(0.5)
        self.kill()
        return code, left

    def kill(self) -> None:
        """Last resort cleanup: SIGKILL the server and whatever of it is left (orphans: only if still ours)."""
        ours = [p for p in self.child_pids if alive(p) and b"multiprocessing" in process_title(p)]
        for pid in [*descendants(self.proc.pid), self.proc.pid, *ours]:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()
        self._log.close()
