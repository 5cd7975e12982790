"""Fuzz and hostile input against a real server (with --api-key, and the issue's small queue limits): no 5xx,
every 4xx in OpenAI's error shape, no hang, and the server answers a reference greedy request identically
afterwards with nothing pending or leaked.

- schemathesis generates requests from the server's own /openapi.json (valid and invalid bodies, every route);
- hand-written cases at the raw HTTP layer (framing, sizes, encodings, headers, unicode, auth);
- an out-of-range number in every number field the schema describes (past int64 for integers; past float32, NaN,
  the infinities and 2**63 for floats), and edge floats (-0.0, subnormals) answered without a 5xx;
- the issue's reproductions (numbers that cannot cross the wire), repeated past the queue limit.
"""

from __future__ import annotations

import collections
import gzip
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from reliability_util import (
    LONG,
    error_shape_problem,
    http_bytes,
    leak_problems,
    raw_exchange,
    reference_ids,
    report,
    server_info,
    size,
    wait_idle,
)
from schemathesis.generation import GenerationMode
from server_fixture import RadixServer

from radixserve import wire

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The issue's limits (8 stuck requests filled them); a short context keeps every generation small.
FLAGS = ("--max-running-requests", "4", "--max-queued-requests", "4", "--context-length", "256")
EXAMPLES = size(ci=6, long=110)  # per route and mode (2 modes for the 7 routes with a body): > 1,500 long
REQUEST_TIMEOUT_S = 60.0
BIG = 2**64  # one past what msgpack can carry


pytestmark = pytest.mark.server_flags(*FLAGS, api_key=KEY)


@pytest.fixture(scope="module")
def reference(server: RadixServer) -> list[int]:
    return reference_ids(server)


class Tally:
    """Responses by status class, and every one that broke a rule."""

    def __init__(self) -> None:
        self.by_class: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []

    def check(self, what: str, status: int, content_type: str, body: bytes) -> None:
        self.by_class[f"{status // 100}xx"] += 1
        if status >= 500:
            self.problems.append(f"{what}: {status} {body[:300]!r}")
        elif status >= 400 and (why := error_shape_problem(status, content_type, body)):
            self.problems.append(f"{what}: {why}")


def test_schema_fuzz(server: RadixServer, reference: list[int]) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    tally = Tally()
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13, [op.label for op in operations]
    for op in operations:
        has_body = bool(op.definition.raw.get("requestBody"))  # nothing to make invalid in a request without one
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_body else (GenerationMode.POSITIVE,):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            def fuzz(case: Any) -> None:
                t = time.monotonic()
                resp = case.call(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT_S)
                tally.check(f"{case.operation.label} {case.body!r:.200}", resp.status_code,
                            (resp.headers.get("content-type") or [""])[0], resp.content)
                assert time.monotonic() - t < REQUEST_TIMEOUT_S

            fuzz()
    info = wait_idle(server)
    report("schema_fuzz", requests=sum(tally.by_class.values()), by_class=dict(tally.by_class),
           problems=len(tally.problems), leaks=leak_problems(info), seconds=round(time.monotonic() - started, 1))
    assert not tally.problems, "\n".join(tally.problems[:20])
    assert not leak_problems(info), info
    assert reference_ids(server) == reference


JSON_BODY = b'{"text": "hi", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}'


def _post(path: str, body: bytes, **headers: str) -> bytes:
    return http_bytes("POST", path, body, {**AUTH, **headers})


HOSTILE = [  # (name, raw request, expected status)
    ("url over the line limit", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("header over the limit", http_bytes("GET", "/health", headers={"X-Big": "a" * 20000}), 431),
    ("too many headers", http_bytes("GET", "/health", headers={f"X-{i}": "1" for i in range(200)}), 431),
    ("negative content-length", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    ("malformed content-length", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n", 400),
    ("two content-lengths", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
     400),
    ("bad chunk size", b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
     400),
    ("content-length and chunked", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("unknown transfer-encoding", b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: bogus\r\n\r\n", 400),
    ("unknown method", b"BREW /generate HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ("wrong method", http_bytes("PUT", "/generate", JSON_BODY, AUTH), 405),
    ("unknown route", http_bytes("GET", "/v2/nothing", headers=AUTH), 404),
    ("TLS on the plain port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40, 400),
    ("no Host header", b"GET /health HTTP/1.1\r\n\r\n", 400),
    ("raw unicode in the path", "GET /générer HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
    ("NUL in a header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    ("gzip body that is not gzip", _post("/generate", JSON_BODY, **{"Content-Encoding": "gzip"}), 400),
    ("deflate body that is not deflate", _post("/generate", JSON_BODY, **{"Content-Encoding": "deflate"}), 400),
    ("chat with a corrupt gzip body", _post("/v1/chat/completions", gzip.compress(JSON_BODY)[:-9],
                                            **{"Content-Encoding": "gzip"}), 400),
    ("brotli", _post("/generate", JSON_BODY, **{"Content-Encoding": "br"}), 415),
    ("unknown encoding", _post("/open_session", b"{}", **{"Content-Encoding": "compress"}), 415),
    ("gzip that inflates past the limit", _post("/generate", gzip.compress(b" " * (5 << 20)),
                                                **{"Content-Encoding": "gzip"}), 413),
    ("declared 1 TB body", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n{", 413),
    ("5 MiB to a route that ignores bodies", http_bytes("POST", "/flush_cache", b"x" * (5 << 20), AUTH), 413),
    ("invalid UTF-8 JSON", _post("/generate", b'{"text": "\xff\xfe"}'), 400),
    ("lone surrogate escape", _post("/generate", b'{"text": "\\ud800", "sampling_params": {"max_new_tokens": 1}}'),
     400),
    ("emoji, RTL and combining marks", _post("/generate", '{"text": "🦜 שלום ́e\\u0301 \\ud83d\\ude00", '
                                             '"sampling_params": {"max_new_tokens": 2}}'.encode()), 200),
    ("unicode stop string and rid", _post("/generate", '{"text": "hi", "rid": "ид-☃", "sampling_params": '
                                          '{"max_new_tokens": 2, "stop": ["☃"]}}'.encode()), 200),
    ("deeply nested JSON", _post("/generate", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400),
    ("a number with 10,000 digits", _post("/generate", b'{"text": "hi", "sampling_params": {"max_new_tokens": '
                                          + b"9" * 10_000 + b"}}"), 400),
    ("float overflow", _post("/generate", b'{"text": "hi", "sampling_params": {"temperature": 1e999}}'), 400),
    ("NaN literal", _post("/generate", b'{"text": "hi", "sampling_params": {"temperature": NaN}}'), 400),
    ("chat content of another type", _post("/v1/chat/completions",
                                           b'{"model": "default", "messages": [{"role": "user", "content": 7}]}'), 400),
    ("a huge int inside a message", _post("/v1/chat/completions", b'{"model": "default", "messages": '
                                          b'[{"role": "user", "content": "hi", "x": %d}]}' % BIG), 400),
    ("good gzip", _post("/generate", gzip.compress(JSON_BODY), **{"Content-Encoding": "gzip"}), 200),
    ("good deflate", _post("/generate", zlib.compress(JSON_BODY), **{"Content-Encoding": "deflate"}), 200),
    ("chunked body", b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
     + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(JSON_BODY) + JSON_BODY + b"\r\n0\r\n\r\n", 200),
    # auth
    ("no key", http_bytes("POST", "/generate", JSON_BODY), 401),
    ("wrong key", _post("/generate", JSON_BODY, Authorization="Bearer nope"), 401),
    ("key in another scheme", _post("/generate", JSON_BODY, Authorization=f"Basic {KEY}"), 401),
    ("non-ASCII key", http_bytes("POST", "/generate", JSON_BODY, {"Authorization": "Bearer клюк"}), 401),
    ("key 10 KB long", _post("/generate", JSON_BODY, Authorization="Bearer " + "k" * 10_000), 401),
    ("public route without a key", http_bytes("GET", "/health"), 200),
    ("openapi.json without a key", http_bytes("GET", "/openapi.json"), 200),
]


@pytest.mark.parametrize(("name", "data", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_http(server: RadixServer, name: str, data: bytes, status: int) -> None:
    started = time.monotonic()
    got, headers, body = raw_exchange(server.port, data)
    assert got == status, body[:300]
    if got >= 400:
        assert error_shape_problem(got, headers.get("content-type", ""), body) is None, body[:300]
    if got == 405 and name == "wrong method":
        assert "POST" in headers.get("allow", "")
    assert time.monotonic() - started < 10


MINIMAL = {  # a valid body per route that reads one
    "/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 1}},
    "/v1/completions": {"model": "default", "prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/responses": {"model": "default", "input": "hi", "max_output_tokens": 1},
    "/open_session": {},
    "/close_session": {"session_id": "x"},
    "/abort_request": {"rid": "x"},
}


# Out of range in every field of its kind: past int64 and msgpack for integers; past float32, not finite and
# 2**63 for floats (NaN and the infinities go out as the JSON literals Python's json writes).
OUT_OF_RANGE = {"integer": [BIG, 2**63], "number": [3.5e38, -3.5e38, 1e39, float("nan"), float("inf"),
                                                    float("-inf"), 2**63]}
EDGES = [-0.0, 5e-324, 1e-310]  # in range for some fields: either answer but a 5xx is fine


def _bad_bodies(doc: dict, values: dict[str, list]) -> Iterator[tuple[str, str, dict]]:
    """(route, field path, body) with one number field set to each of `values[its type]`, for every number field of
    every route; /generate's sampling_params as the route parses it (SamplingParams)."""
    _, sampling = msgspec.json.schema_components([wire.SamplingParams])
    components = doc["components"]["schemas"] | sampling
    for path, ops in doc["paths"].items():
        body_schema = ops.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json")
        if body_schema is None:
            continue
        top = components[body_schema["schema"]["$ref"].rsplit("/", 1)[1]]
        properties = dict(top["properties"])
        if path == "/generate":
            properties["sampling_params"] = {"$ref": "#/$defs/SamplingParams"}
        for name, prop in properties.items():
            for field, value in _leaf_values(prop, components, values):
                body = {**MINIMAL[path], name: value}
                if name == "sampling_params":
                    body[name] = {**MINIMAL[path].get(name, {}), **value}
                yield path, ".".join([name, *field]), body


def _leaf_values(schema: dict, components: dict, values: dict[str, list],
                 depth: int = 0) -> Iterator[tuple[list[str], Any]]:
    """(path below this field, a value for this field) putting each of `values` at each number reachable from
    `schema`."""
    if "$ref" in schema:
        yield from _leaf_values(components[schema["$ref"].rsplit("/", 1)[1]], components, values, depth)
        return
    for option in schema.get("anyOf", []):
        yield from _leaf_values(option, components, values, depth)
    kind = schema.get("type")
    if kind in values:
        for value in values[kind]:
            yield [], value
    elif kind == "array" and depth < 3:
        for path, value in _leaf_values(schema.get("items", {}), components, values, depth + 1):
            yield path, [value]
    elif kind == "object" and depth < 3:
        required = {n: "x" for n in schema.get("required", []) if schema["properties"][n].get("type") == "string"}
        for name, prop in schema.get("properties", {}).items():
            for path, value in _leaf_values(prop, components, values, depth + 1):
                yield [name, *path], {**required, name: value}
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):  # a map of numbers, such as logit_bias
            for path, value in _leaf_values(extra, components, values, depth + 1):
                yield ["*", *path], {"5": value}


def test_out_of_range_number_in_every_field(server: RadixServer) -> None:
    doc = server.get("/openapi.json").json()
    cases = list(_bad_bodies(doc, OUT_OF_RANGE))
    fields = {(route, field) for route, field, _ in cases}
    assert {("/generate", "session_params.offset"), ("/open_session", "capacity_of_str_len"),
            ("/generate", "sampling_params.temperature"), ("/generate", "sampling_params.logit_bias.*"),
            ("/v1/chat/completions", "logit_bias.*"), ("/open_session", "timeout")} <= fields, sorted(fields)
    tally = Tally()
    for route, field, body in cases:
        resp = server.post(route, body)
        tally.check(f"{route} {field}", resp.status_code, resp.headers.get("content-type", ""), resp.content)
        assert resp.status_code == 400, (route, field, body, resp.text)
    edges = list(_bad_bodies(doc, {"number": EDGES}))
    for route, field, body in edges:
        resp = server.post(route, body)
        tally.check(f"{route} {field}", resp.status_code, resp.headers.get("content-type", ""), resp.content)
    assert not tally.problems, tally.problems
    assert server.get("/health_generate").status_code == 200
    report("out_of_range_numbers", requests=len(cases) + len(edges), fields=len(fields))


def test_issue_reproductions_do_not_disable_the_server(server: RadixServer) -> None:
    """Requests whose numbers pass validation but cannot be encoded once left entries pending for good: 8 of
    them made every later /generate and /health_generate a 429 at these limits."""
    repeats = 4 * 4 + 2  # past --max-running-requests + --max-queued-requests
    for _ in range(repeats):
        resp = server.post("/generate", {"text": "hi", "session_params": {"id": "s", "offset": BIG}})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "session_params.offset", resp.text
        resp = server.post("/open_session", {"capacity_of_str_len": BIG})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "capacity_of_str_len", resp.text
    assert server.post("/generate", MINIMAL["/generate"]).status_code == 200
    assert server.get("/health_generate").status_code == 200
    assert server_info(server)["num_pending_http_reqs"] == 0


def test_session_timeout_is_the_sessions_not_the_calls(server: RadixServer) -> None:
    """Found by the fuzz: /open_session's `timeout` (seconds a session may idle) was taken as the gateway's wait
    for the scheduler's reply, so a tiny one answered 503 and a large one could hold the request that long."""
    resp = server.post("/open_session", {"timeout": 0.2})
    assert resp.status_code == 200, resp.text
    session = resp.json()
    time.sleep(1.5)  # the scheduler closes it once idle past its timeout
    resp = server.post("/close_session", {"session_id": session})
    assert resp.status_code == 400 and "not open" in resp.json()["error"]["message"], resp.text


def test_client_gone_mid_body_is_no_server_error(server: RadixServer) -> None:
    """A client that resets its connection while its body is being read is one INFO line (at this server's
    --log-level warning, none), not an ERROR with a traceback."""
    head = http_bytes("POST", "/generate", b"", {**AUTH, "Content-Length": "1000"})
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(head + b'{"text": "hi", ')
        time.sleep(0.2)  # the handler is reading the body
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, not a FIN
    time.sleep(0.5)
    assert server.get("/health").status_code == 200


def test_unharmed_afterwards(server: RadixServer, reference: list[int]) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    info = wait_idle(server)
    assert not leak_problems(info), info
    assert reference_ids(server) == reference
    assert server.get("/health").status_code == 200
