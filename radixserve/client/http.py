"""HTTP client for radixserve (and SGLang, which has the same native API).

`AsyncClient` is the implementation (one aiohttp session, at most `max_connections` connections);
`Client` is its blocking face for scripts and notebooks: the same methods, run on a private event
loop thread, so it also works where another loop is already running (Jupyter).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from radixserve.client._sync import LoopThread, blocking, iterating
from radixserve.client.errors import APIConnectionError, APIStatusError, APITimeoutError, ClientError, StreamError

DEFAULT_URL = "http://127.0.0.1:30000"


@dataclass(frozen=True)
class HealthStatus:
    """The server's health as `health_check()` saw it; a figure the server does not report is None."""

    available: bool
    latency: float | None = None
    """Seconds GET /health took."""
    queue_length: int | None = None
    """Requests waiting to be scheduled."""
    kv_usage: float | None = None
    """Fraction of the KV cache held by running requests and pinned sessions (0..1)."""
    gpu_memory_used: int | None = None
    """Bytes, as the server measured them at start-up (None on a CPU server)."""
    gpu_memory_free: int | None = None
    error: str | None = None
    """Why the server is unavailable, or which figures could not be read."""


class AsyncClient:
    """Async client. `timeout` (seconds) bounds a whole request, or for a stream each wait for data;
    `api_key` is sent as `Authorization: Bearer`; `model` names the model on the OpenAI routes
    (default: the first of GET /v1/models). Use it on one event loop; close it with `close()` or
    `async with`."""

    def __init__(self, base_url: str = DEFAULT_URL, timeout: float | None = 600.0, max_connections: int = 64,
                 api_key: str | None = None, model: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_connections = max_connections
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------ generation

    async def generate(self, text: str | list[str] | None = None, sampling_params: dict[str, Any] | None = None, *,
                       input_ids: list[int] | list[list[int]] | None = None, **fields: Any) -> Any:
        """POST /generate; returns the server's `{text, output_ids, meta_info}` (a list for a list of
        prompts). `fields` go into the body as they are: `rid`, `session_params`, `return_logprob`, ..."""
        return await self._call("POST", "/generate", _native_body(text, sampling_params, input_ids, fields))

    async def generate_stream(self, text: str | list[str] | None = None,
                              sampling_params: dict[str, Any] | None = None, *,
                              input_ids: list[int] | list[list[int]] | None = None,
                              **fields: Any) -> AsyncGenerator[dict[str, Any], None]:
        """POST /generate with `stream: true`: yields each event (`text` is cumulative). Raises
        StreamError on an error event or if the stream ends before `data: [DONE]`."""
        body = {**_native_body(text, sampling_params, input_ids, fields), "stream": True}
        read_timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
        async with self._response("POST", "/generate", body, read_timeout) as resp:
            async for event in sse_events(resp):
                yield event

    async def chat(self, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        """POST /v1/chat/completions (not streamed); `fields` are OpenAI's (`max_tokens`, `seed`, ...)
        and SGLang's (`session_params`, ...)."""
        if fields.get("stream"):
            raise ValueError("chat() does not stream; use generate_stream() or an OpenAI client")
        body = {"model": await self._model(), "messages": messages, **fields}
        return await self._call("POST", "/v1/chat/completions", body)

    # ------------------------------------------------------------ sessions

    async def open_session(self, capacity_of_str_len: int = 65536, session_id: str | None = None,
                           timeout: float | None = None) -> str:
        """POST /open_session; returns the session id (`session_id` if given, else the server's).
        `timeout`: seconds idle after which the server closes it."""
        body: dict[str, Any] = {"capacity_of_str_len": capacity_of_str_len}
        if session_id is not None:
            body["session_id"] = session_id
        if timeout is not None:
            body["timeout"] = timeout
        return await self._call("POST", "/open_session", body)

    async def close_session(self, session_id: str) -> None:
        """POST /close_session."""
        await self._call("POST", "/close_session", {"session_id": session_id})

    # ------------------------------------------------------------ health

    async def server_info(self) -> dict[str, Any]:
        """GET /get_server_info."""
        return await self._call("GET", "/get_server_info")

    async def model_info(self) -> dict[str, Any]:
        """GET /get_model_info (`model_path`, `tokenizer_path`, ...)."""
        return await self._call("GET", "/get_model_info")

    async def health_check(self, timeout: float = 10.0) -> HealthStatus:
        """GET /health for availability and latency, then GET /get_server_info for the load figures.
        Never raises: failures are reported in `available` and `error`."""
        limit = aiohttp.ClientTimeout(total=timeout)
        start = time.perf_counter()
        try:
            await self._call("GET", "/health", timeout=limit)
        except ClientError as e:
            return HealthStatus(False, error=str(e))
        latency = time.perf_counter() - start
        try:
            info = await self._call("GET", "/get_server_info", timeout=limit)
        except ClientError as e:
            return HealthStatus(True, latency, error=f"no server figures: {e}")
        used, free = _stat(info, "gpu_memory_used"), _stat(info, "gpu_memory_free")
        known = bool(used or free)  # radixserve on a CPU reports 0 and 0
        return HealthStatus(True, latency, queue_length=_stat(info, "num_waiting_reqs"),
                            kv_usage=_stat(info, "token_usage"), gpu_memory_used=used if known else None,
                            gpu_memory_free=free if known else None)

    async def wait_for_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        """Poll GET /health_generate (a one-token generation) until it succeeds. Raises TimeoutError
        after `timeout` seconds, and APIStatusError at once on a 4xx (e.g. a wrong API key)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while (left := deadline - time.monotonic()) > 0:
            try:
                await self._call("GET", "/health_generate", timeout=aiohttp.ClientTimeout(total=left))
                return
            except APIStatusError as e:
                if e.status < 500:
                    raise
                last = str(e)
            except APIConnectionError as e:
                last = str(e)
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        raise TimeoutError(f"{self.base_url} not ready within {timeout} s (last: {last})")

    # ------------------------------------------------------------ transport

    async def _model(self) -> str:
        if self.model is None:
            self.model = (await self._call("GET", "/v1/models"))["data"][0]["id"]
        return self.model

    async def _call(self, method: str, path: str, body: Any = None,
                    timeout: aiohttp.ClientTimeout | None = None) -> Any:
        async with self._response(method, path, body, timeout) as resp:
            return await _decode(resp)

    @asynccontextmanager
    async def _response(self, method: str, path: str, body: Any = None,
                        timeout: aiohttp.ClientTimeout | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a 2xx status: 4xx/5xx raise APIStatusError, transport failures (also while
        the body is read) APIConnectionError, and timeouts APITimeoutError."""
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout), headers=self._headers)
        try:
            async with self._http.request(method, self.base_url + path, json=body,
                                          timeout=timeout or self._http.timeout) as resp:
                if resp.status >= 400:
                    raise await _status_error(resp)
                yield resp
        except asyncio.TimeoutError as e:
            raise APITimeoutError(f"{method} {path}: timed out") from e
        except aiohttp.ClientError as e:
            raise APIConnectionError(f"{method} {path}: {e}") from e


class Client:
    """Blocking client: AsyncClient's methods and arguments, run on a private event loop thread.
    Safe to share between threads; close it with `close()` or `with`."""

    def __init__(self, base_url: str = DEFAULT_URL, timeout: float | None = 600.0, max_connections: int = 64,
                 api_key: str | None = None, model: str | None = None) -> None:
        self._impl = AsyncClient(base_url, timeout, max_connections, api_key, model)
        self._loop = LoopThread()

    @property
    def base_url(self) -> str:
        return self._impl.base_url

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.loop.is_closed():
            self._loop.run(self._impl.close())
            self._loop.stop()

    generate = blocking(AsyncClient.generate)
    generate_stream = iterating(AsyncClient.generate_stream)
    chat = blocking(AsyncClient.chat)
    open_session = blocking(AsyncClient.open_session)
    close_session = blocking(AsyncClient.close_session)
    server_info = blocking(AsyncClient.server_info)
    model_info = blocking(AsyncClient.model_info)
    health_check = blocking(AsyncClient.health_check)
    wait_for_ready = blocking(AsyncClient.wait_for_ready)


def _native_body(text: Any, sampling_params: Any, input_ids: Any, fields: dict[str, Any]) -> dict[str, Any]:
    given = {"text": text, "input_ids": input_ids, "sampling_params": sampling_params}
    return {**{k: v for k, v in given.items() if v is not None}, **fields}


def _stat(info: Any, key: str) -> Any:
    """`key` from get_server_info: top level, radixserve's scheduler/worker sections, or SGLang's internal_states."""
    if not isinstance(info, dict):
        return None
    sections = [info, info.get("scheduler"), info.get("worker"), *(info.get("internal_states") or [])]
    return next((s[key] for s in sections if isinstance(s, dict) and s.get(key) is not None), None)


async def _decode(resp: aiohttp.ClientResponse) -> Any:
    """The body: parsed if JSON, text otherwise, None if empty."""
    text = await resp.text()
    if not text:
        return None
    return json.loads(text) if resp.content_type == "application/json" else text


async def _status_error(resp: aiohttp.ClientResponse) -> APIStatusError:
    body = await resp.text(errors="replace")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    error = None
    if isinstance(data, dict):  # OpenAI's {"error": {...}}, or SGLang's flat {"object": "error", "message": ...}
        error = data["error"] if isinstance(data.get("error"), dict) else data if "message" in data else None
    return APIStatusError(resp.status, body, error)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a server-sent-event stream, one per `data:` line, up to `data: [DONE]`."""
    rest = b""
    try:
        async for chunk in resp.content.iter_any():
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                try:
                    event = json.loads(payload)
                except ValueError as e:
                    raise StreamError(f"malformed stream event: {payload[:200]!r}") from e
                if isinstance(event, dict) and "error" in event:
                    error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
                    raise StreamError(f"stream error: {error.get('message')}", error)
                yield event
    except aiohttp.ClientPayloadError as e:
        raise StreamError(f"the stream was cut: {e}") from e
    raise StreamError("the stream ended before data: [DONE]")
