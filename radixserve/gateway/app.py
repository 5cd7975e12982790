"""The HTTP gateway (aiohttp): SGLang-native and OpenAI-compatible routes over one generate path.

Every error leaves as OpenAI's `{"error": {...}}` with a 4xx (a 500 only for a bug here); a
client that disconnects has its requests aborted in the scheduler (the handler is cancelled,
and `_generate`'s `finally` cancels the Generation).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import msgspec
from aiohttp import web

from radixserve import __version__, wire
from radixserve.config import ServerArgs
from radixserve.errors import ApiError, bad_request, from_validation
from radixserve.gateway import http_errors, loads, metrics, openapi
from radixserve.gateway.native import GenerateRequest, NativeFormat, build_requests
from radixserve.gateway.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_requests,
    check_model,
    completion_echo,
    completion_requests,
    reasoning_parsers,
)
from radixserve.gateway.openai_format import ChatCompletion, ChatFormat, Completion, CompletionFormat
from radixserve.gateway.responses_api import ResponsesRequest, chat_request
from radixserve.gateway.responses_format import Response, ResponsesFormat
from radixserve.gateway.tokenizer_client import Generation, TokenizerClient
from radixserve.native_api import Output

log = logging.getLogger("radixserve.http")

OPEN_WHILE_DRAINING = frozenset({"/metrics", "/get_server_info", "/abort_request"})
HEALTH_TIMEOUT_S = 30.0
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"  # the end of a native, completion or chat stream (a Responses stream has none)
T = TypeVar("T")


class Child(Protocol):
    """A supervised child process, as the launcher's ProcessGroup holds it (multiprocessing.Process)."""

    name: str
    pid: int | None
    exitcode: int | None


class Format(Protocol):
    def response(self, gen: Generation, outputs: list[Output]) -> Any: ...
    def head(self, gen: Generation) -> list[Any]: ...
    def events(self, gen: Generation, batch: list[tuple[int, wire.TextDelta]]) -> list[Any]: ...
    def tail(self, gen: Generation) -> list[Any]: ...


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(obj), content_type="application/json")


def _sse(events: list[Any]) -> bytes:
    return b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in events)


class Gateway:
    def __init__(self, args: ServerArgs, client: TokenizerClient, model_dir: str, model_name: str,
                 children: Sequence[Child]) -> None:
        self.args = args
        self.client = client
        self.model_dir = model_dir
        self.model_name = model_name
        self.children = children

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.args.max_request_bytes,
                              middlewares=[http_errors.middleware(self.args.max_request_bytes), self._gate])
        for route in ROUTES:
            if route.path == "/metrics" and self.args.disable_metrics:
                continue
            add = app.router.add_get if route.method == "GET" else app.router.add_post
            add(route.path, route.handler.__get__(self))
        return app

    # ------------------------------------------------------------ middleware

    @web.middleware
    async def _gate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Auth (all but the public routes), then 503 until the backend is ready, and 503 once it drains
        (SIGTERM), except for monitoring and aborts, so load balancers take it out while requests finish."""
        public = (PUBLIC_PATHS | {"/metrics"}) if self.args.metrics_public else PUBLIC_PATHS
        if self.args.api_key is not None and request.path not in public:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.args.api_key}".encode()):
                raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)")
        if not self.client.ready.is_set():
            raise ApiError(503, "the server is still loading")
        if self.client.draining and request.path not in OPEN_WHILE_DRAINING:
            raise ApiError(503, "the server is shutting down")
        return await handler(request)

    # ------------------------------------------------------------ health and info

    async def health(self, request: web.Request) -> web.Response:
        if any(p.exitcode is not None for p in self.children):
            raise ApiError(503, "a server process has exited")
        return web.Response(text="OK")

    async def health_generate(self, request: web.Request) -> web.Response:
        # Token ids, not text: the check must also pass on a server without a tokenizer.
        req = wire.GenerateText(rid=f"health-{uuid.uuid4().hex}", input_ids=[0],
                                sampling=wire.SamplingParams(max_new_tokens=1, temperature=0.0), log_metrics=False)
        gen = self.client.submit([req])
        try:
            await asyncio.wait_for(gen.results(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(503, f"no token generated within {HEALTH_TIMEOUT_S:.0f} s") from None
        finally:
            self.client.cancel(gen)
        return web.Response(text="OK")

    async def model_info(self, request: web.Request) -> web.Response:
        return _json({"model_path": self.args.model_path or self.model_dir, "model_dir": self.model_dir,
                      "tokenizer_path": self.args.tokenizer_path or self.model_dir,
                      "served_model_name": self.model_name, "is_generation": True})

    async def metrics(self, request: web.Request) -> web.Response:
        return await metrics.scrape(self.client, self.model_name)

    async def server_info(self, request: web.Request) -> web.Response:
        status = await self._server_status()
        # served_model_name resolved, as SGLang's: its router names the model (/v1/models) after it.
        server_args = {**dataclasses.asdict(self.args), "api_key": None, "served_model_name": self.model_name}
        return _json({**server_args, "version": __version__, "num_pending_http_reqs": self.client.num_pending,
                      "processes": {p.name: p.pid for p in self.children}, "worker": status.runtime,
                      "scheduler": status.scheduler_info()})

    async def get_load(self, request: web.Request) -> web.Response:
        """SGLang's load report, one entry per data-parallel rank (here one); its router polls it (power_of_two)."""
        s = (await self._server_status()).scheduler
        return _json([{"dp_rank": 0, "num_reqs": s.num_running_reqs + s.num_waiting_reqs,
                       "num_waiting_reqs": s.num_waiting_reqs, "num_tokens": s.used_tokens}])

    async def loads(self, request: web.Request) -> web.Response:
        """SGLang's newer load report (smg polls it first): gateway/loads.py."""
        s = (await self._server_status()).scheduler
        return _json(loads.report(s, self.args.max_running_requests, request.query.get("dp_rank")))

    async def flush_cache(self, request: web.Request) -> web.Response:
        await self._control_ok(wire.FlushCache)
        return web.Response(text="Cache flushed.\n")

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self._parse(request, AbortRequest)
        if body.abort_all:
            return _json({"aborted": self.client.abort_all()})
        if body.rid is None:
            raise bad_request("give rid or abort_all: true", "rid")
        return _json({"aborted": int(self.client.abort(body.rid))})

    async def open_session(self, request: web.Request) -> web.Response:
        body = await self._parse(request, OpenSessionRequest)
        opened = (await self._control_ok(wire.OpenSession, capacity_of_str_len=body.capacity_of_str_len,
                                         session_id=body.session_id, idle_timeout=body.timeout)).result
        assert isinstance(opened, wire.SessionOpened)
        return _json(opened.session_id)

    async def close_session(self, request: web.Request) -> web.Response:
        body = await self._parse(request, CloseSessionRequest)
        await self._control_ok(wire.CloseSession, session_id=body.session_id)
        return _json({"success": True})

    async def _parse(self, request: web.Request, kind: type[T]) -> T:
        return await _parse(request, kind, self.args.request_body_timeout)

    async def _server_status(self) -> wire.ServerStatus:
        status = (await self._control_ok(wire.GetServerInfo)).result
        assert isinstance(status, wire.ServerStatus)
        return status

    async def _control_ok(self, kind: type[wire.ControlCall], **fields: Any) -> wire.ControlReply:
        reply = await self.client.control(kind, **fields)
        if not reply.ok:
            raise ApiError(reply.status, reply.error or f"{kind.__name__} failed")
        return reply

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi.document(request.app.router, OPERATIONS))

    async def models(self, request: web.Request) -> web.Response:
        context = self.client.runtime.context_length if self.client.runtime is not None else 0
        return _json({"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                  "owned_by": "radixserve", "root": self.model_dir,
                                                  "max_model_len": context}]})

    # ------------------------------------------------------------ generation

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._parse(request, GenerateRequest)
        single, reqs = build_requests(body)
        return await self._generate(request, reqs, body.stream, NativeFormat(single, len(reqs)))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._parse(request, CompletionRequest)
        check_model(body.model, self.model_name)
        reqs = completion_requests(body)
        return await self._generate(request, reqs, body.stream, CompletionFormat(
            reqs[0].rid, self.model_name, body.n, len(reqs), body.stream_options, completion_echo(body, reqs)))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._parse(request, ChatCompletionRequest)
        check_model(body.model, self.model_name)
        reqs, parsers = chat_requests(body, self.client.tool_call_format)
        reasoning = reasoning_parsers(body, self.args.reasoning_parser, len(reqs))
        return await self._generate(request, reqs, body.stream, ChatFormat(
            reqs[0].rid, self.model_name, body.n, len(reqs), body.stream_options, parsers, reasoning))

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._parse(request, ResponsesRequest)
        check_model(body.model, self.model_name)
        chat = chat_request(body)
        reqs, parsers = chat_requests(chat, self.client.tool_call_format)
        reasoning = reasoning_parsers(chat, self.args.reasoning_parser, 1)
        fmt = ResponsesFormat(reqs[0].rid, self.model_name, body, parsers[0] if parsers else None,
                              reasoning[0] if reasoning else None)
        return await self._generate(request, reqs, chat.stream, fmt, done=b"")

    async def _generate(self, request: web.Request, reqs: list[wire.GenerateText], stream: bool,
                        fmt: Format, done: bytes = SSE_DONE) -> web.StreamResponse:
        """The one generate path. A stream waits for its first update before sending headers, so a
        request the tokenizer or scheduler rejects still gets a 4xx; later errors become an error event."""
        gen = self.client.submit(reqs, stream)
        try:
            if not stream:
                return _json(fmt.response(gen, await gen.results()))
            updates = gen.updates()
            batch: list[tuple[int, wire.TextDelta]] | None = await anext(updates)
            resp = web.StreamResponse(headers=SSE_HEADERS)
            await resp.prepare(request)
            events = fmt.head(gen)
            try:
                while batch is not None:
                    payload = _sse(events + fmt.events(gen, batch))
                    if payload:
                        await resp.write(payload)
                    events = []
                    batch = await anext(updates, None)
                await resp.write(_sse(fmt.tail(gen)) + done)
            except ApiError as e:
                await resp.write(_sse([e.body()]) + done)
            return resp
        finally:
            self.client.cancel(gen)


class AbortRequest(msgspec.Struct, forbid_unknown_fields=True):
    rid: str | None = None
    abort_all: bool = False


class OpenSessionRequest(msgspec.Struct, forbid_unknown_fields=True):
    capacity_of_str_len: wire.Count = 0
    session_id: str | None = None
    timeout: wire.Seconds | None = None


class CloseSessionRequest(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str


class Route(NamedTuple):
    """One route: the Gateway method that answers it and what /openapi.json says of it."""

    method: str
    path: str
    handler: Callable[[Gateway, web.Request], Awaitable[web.StreamResponse]]
    op: openapi.Operation


Op = openapi.Operation
ROUTES = [  # the route table: every route the gateway serves, registered and described from here
    Route("GET", "/health", Gateway.health, Op("liveness: every process is up", response_type="text/plain",
                                                public=True)),
    Route("GET", "/health_generate", Gateway.health_generate, Op(
        "readiness: a one-token generation succeeds", response_type="text/plain", public=True)),
    Route("GET", "/get_model_info", Gateway.model_info, Op("the model served")),
    Route("GET", "/get_server_info", Gateway.server_info, Op(
        "server arguments, processes and live scheduler statistics")),
    Route("GET", "/get_load", Gateway.get_load, Op(
        "SGLang's load report: [{dp_rank, num_reqs, num_waiting_reqs, num_tokens}]")),
    Route("GET", "/v1/loads", Gateway.loads, Op(
        "SGLang's load report: {timestamp, version, dp_rank_count, loads: [per dp rank], aggregate}; ?dp_rank=N")),
    Route("GET", "/loads", Gateway.loads, Op("SGLang's load report (the same as /v1/loads)")),
    # SGLang's newer names (its router asks for these first)
    Route("GET", "/model_info", Gateway.model_info, Op("the model served (SGLang's newer name of /get_model_info)")),
    Route("GET", "/server_info", Gateway.server_info, Op(
        "server arguments, processes and live scheduler statistics (SGLang's newer name of /get_server_info)")),
    Route("GET", "/flush_cache", Gateway.flush_cache, Op("empty the radix cache (when idle)",
                                                         response_type="text/plain")),
    Route("POST", "/flush_cache", Gateway.flush_cache, Op("empty the radix cache (when idle)",
                                                          response_type="text/plain")),
    Route("POST", "/abort_request", Gateway.abort_request, Op("abort a request by rid, or all of them", AbortRequest)),
    Route("POST", "/open_session", Gateway.open_session, Op("open a session; answers its id", OpenSessionRequest)),
    Route("POST", "/close_session", Gateway.close_session, Op("close a session", CloseSessionRequest)),
    Route("POST", "/generate", Gateway.generate, Op("SGLang's native generation", GenerateRequest, streams=True)),
    Route("GET", "/v1/models", Gateway.models, Op("the served model, as OpenAI's model list")),
    Route("POST", "/v1/completions", Gateway.completions, Op("OpenAI completions", CompletionRequest, Completion,
                                                             streams=True)),
    Route("POST", "/v1/chat/completions", Gateway.chat_completions, Op(
        "OpenAI chat completions", ChatCompletionRequest, ChatCompletion, streams=True)),
    Route("POST", "/v1/responses", Gateway.responses, Op(
        "OpenAI responses (text and function tools; nothing is stored)", ResponsesRequest, Response, streams=True)),
    Route("GET", "/openapi.json", Gateway.openapi, Op("this document", public=True)),
    Route("GET", "/metrics", Gateway.metrics, Op(
        "Prometheus metrics (public with --metrics-public; absent with --disable-metrics)",
        response_type="text/plain")),
]
OPERATIONS = {(r.method, r.path): r.op for r in ROUTES}  # (method, path) -> its Operation (tests/test_openapi.py)
PUBLIC_PATHS = frozenset(r.path for r in ROUTES if r.op.public)  # health, and as vLLM the API description

_DECODERS = {kind: msgspec.json.Decoder(kind) for kind in
             (GenerateRequest, CompletionRequest, ChatCompletionRequest, ResponsesRequest, AbortRequest,
              OpenSessionRequest, CloseSessionRequest)}


async def _parse(request: web.Request, kind: type[T], timeout: float) -> T:
    """The JSON body as `kind`; 400 naming the offending field otherwise (413 if too large, 408 if it has not
    arrived within `timeout` seconds)."""
    try:
        body = await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s",
                       code="request_timeout") from None
    try:
        return _DECODERS[kind].decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise from_validation(e) from None

