"""Shared by the reliability suite (tests/test_reliability_*.py): its size, the error-shape check, raw HTTP on
sockets, and the server's idle state (nothing pending, no KV held, invariants ok).

Sizes: CI-sized by default; RADIXSERVE_LONG=1 runs the long size (docs/reliability.md), and each test prints
one `RELIABILITY {...}` line with its figures (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import msgspec
from server_fixture import RadixServer

LONG = os.environ.get("RADIXSERVE_LONG") == "1"


def size(ci: int, long: int) -> int:
    return long if LONG else ci


class ErrorDetail(msgspec.Struct, forbid_unknown_fields=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, forbid_unknown_fields=True):
    error: ErrorDetail


def error_shape_problem(status: int, content_type: str, body: bytes) -> str | None:
    """Why a 4xx/5xx response is not in OpenAI's error shape (None if it is)."""
    if not content_type.startswith("application/json"):
        return f"{status} with Content-Type {content_type!r}: {body[:200]!r}"
    try:
        err = msgspec.json.decode(body, type=ErrorBody)
    except msgspec.DecodeError as e:
        return f"{status} body is not the error object ({e}): {body[:200]!r}"
    return None if err.error.message else f"{status} with an empty message"


def report(name: str, **figures: object) -> None:
    print(f"\nRELIABILITY {json.dumps({'test': name, 'long': LONG, **figures})}", flush=True)


# ---------------------------------------------------------------- raw HTTP


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as it is and read one response (status, lower-cased headers, body); TimeoutError if none."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf:
            buf += _recv(sock, deadline, buf)
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            body += _recv(sock, deadline, body)
        return status, headers, body[:length]


def _recv(sock: socket.socket, deadline: float, so_far: bytes) -> bytes:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        chunk = sock.recv(65536)
    except TimeoutError:
        raise TimeoutError(f"no complete response: {so_far[:200]!r}") from None
    if not chunk:
        raise ConnectionError(f"connection closed mid-response: {so_far[:200]!r}")
    return chunk


def http_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body)),
            **(headers or {})}
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode(
        "utf-8") + body


async def open_request(port: int, path: str, body: object,
                       headers: dict[str, str] | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a JSON request on a fresh connection; the caller reads (or walks away) as it pleases."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(http_bytes("POST", path, json.dumps(body).encode(), headers))
    await writer.drain()
    return reader, writer


# ---------------------------------------------------------------- server state


def server_info(server: RadixServer) -> dict:
    return server.get("/get_server_info").json()


def wait_idle(server: RadixServer, timeout: float = 30.0) -> dict:
    """Server info once nothing is pending, running or waiting (or the last one seen at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        info = server_info(server)
        sched = info["scheduler"]
        idle = info["num_pending_http_reqs"] == 0 and sched["num_running_reqs"] == 0 and sched["num_waiting_reqs"] == 0
        if idle and sched["invariants"] != "unchecked" or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def leak_problems(info: dict) -> list[str]:
    """What an idle server still holds that it should not: pending requests, running or waiting ones, KV
    that is neither free nor evictable cache (beyond what open sessions pin), or broken invariants."""
    sched = info["scheduler"]
    problems = []
    if info["num_pending_http_reqs"]:
        problems.append(f"{info['num_pending_http_reqs']} requests pending in the gateway")
    if sched["num_running_reqs"] or sched["num_waiting_reqs"]:
        problems.append(f"{sched['num_running_reqs']} running / {sched['num_waiting_reqs']} waiting")
    held = sched["max_total_num_tokens"] - sched["kv_free_tokens"] - sched["kv_evictable_tokens"]
    if held > sched["session_pinned_tokens"]:  # forks share their pinned prefix: it counts once per session
        problems.append(f"{held} KV tokens held (sessions pin {sched['session_pinned_tokens']})")
    if sched["invariants"] != "ok":
        problems.append(f"invariants: {sched['invariants']}")
    return problems


def flush_empties_pool(server: RadixServer) -> dict:
    """POST /flush_cache on an idle server without sessions; the KV pool must be all free afterwards."""
    resp = server.post("/flush_cache", {})
    assert resp.status_code == 200, resp.text
    sched = server_info(server)["scheduler"]
    assert sched["kv_free_tokens"] == sched["max_total_num_tokens"] and sched["kv_cached_tokens"] == 0, sched
    return sched


REFERENCE = {"text": "The three primary colors are", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}


def reference_ids(server: RadixServer) -> list[int]:
    """Greedy output ids of a fixed request: the same before and after whatever a test throws at the server."""
    resp = server.post("/generate", REFERENCE)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]
