"""HTTP-layer errors in the API's shape: `{"error": {"message", "type", "param", "code"}}` at every layer.

Two places produce them:
- `middleware`: errors raised while a route runs (ApiError, aiohttp's HTTPException such as 404/405/413, a
  body that does not decode or de-chunk, anything unexpected as a 500 with its traceback logged), plus the
  checks made before a body is read: a declared Content-Length over the limit (413, the connection closed
  unread) and a Content-Encoding the server cannot decode (415).
- `ApiAppRunner`: aiohttp's HTTP parser fails before any middleware runs (a request line or header over its
  limit, a bad Content-Length or chunk size, conflicting framing, an unknown method, an encoding whose
  decoder is not installed); its connections answer those in the same shape (`ApiRequestHandler`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    ContentEncodingError,
    HttpProcessingError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from radixserve.errors import ApiError

log = logging.getLogger("radixserve.http")

# Parser limits. They differ so that a LineTooLong says which one was crossed: the request line (414) or a
# header (431).
MAX_REQUEST_LINE = 8190  # aiohttp's default
MAX_HEADER_FIELD = 16384  # name + value of one header
MAX_HEADERS = 128
ENCODINGS = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})  # what aiohttp may decode


def error_response(e: ApiError, extra_headers: Any = None) -> web.Response:
    return web.Response(status=e.status, body=msgspec.json.encode(e.body()), content_type="application/json",
                        headers={**e.headers(), **(extra_headers or {})})


def _from_http_exception(e: web.HTTPException, max_request_bytes: int) -> ApiError:
    if e.status == 413:
        return ApiError(413, f"request body too large (limit {max_request_bytes} bytes)")
    return ApiError(e.status, e.reason)


def _from_payload_error(e: RequestPayloadError) -> ApiError:
    """A body that arrived broken: it does not decompress, its chunking is wrong, or it was cut short."""
    cause = e.__cause__
    if isinstance(cause, ContentEncodingError):
        return ApiError(400, f"the body does not decode as its Content-Encoding ({cause.message})",
                        code="bad_content_encoding")
    return ApiError(400, f"malformed request body: {cause.message if isinstance(cause, HttpProcessingError) else e}",
                    code="bad_request_body")


def _declared_body_error(request: web.Request, max_request_bytes: int) -> ApiError | None:
    """What is wrong with the body as its headers declare it, before a byte of it is read."""
    if request.content_length is not None and request.content_length > max_request_bytes:
        return ApiError(413, f"request body too large ({request.content_length} bytes declared, "
                             f"limit {max_request_bytes} bytes)")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ENCODINGS:
        return ApiError(415, f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or none)",
                        code="unsupported_content_encoding")
    return None


def middleware(max_request_bytes: int) -> Any:
    """The outermost middleware: every error a route raises leaves as an ApiError response."""

    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        early = _declared_body_error(request, max_request_bytes)
        if early is not None:
            resp = error_response(early)
            resp.force_close()  # the body stays unread: the connection cannot be reused
            return resp
        try:
            return await handler(request)
        except ApiError as e:
            return error_response(e)
        except web.HTTPException as e:  # aiohttp's own: unknown route, wrong method (with Allow), too large
            if e.status < 400:
                raise
            allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            return error_response(_from_http_exception(e, max_request_bytes), allow)
        except RequestPayloadError as e:
            resp = error_response(_from_payload_error(e))
            resp.force_close()
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("internal error on %s %s", request.method, request.path)
            return error_response(ApiError(500, "internal server error"))

    return errors


def parser_error(status: int, exc: BaseException | None) -> ApiError:
    """The ApiError for a request aiohttp's parser rejected (or, status 500/504, one no middleware caught)."""
    if isinstance(exc, LineTooLong):
        if exc.args[1] == MAX_REQUEST_LINE:
            return ApiError(414, f"request line too long (limit {MAX_REQUEST_LINE} bytes)", code="uri_too_long")
        return ApiError(431, f"request header too large (limit {MAX_HEADER_FIELD} bytes)",
                        code="header_too_large")
    if isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers"):
        return ApiError(431, f"too many request headers (limit {MAX_HEADERS})", code="header_too_large")
    if isinstance(exc, ContentEncodingError):  # raised at the headers: no decoder for this encoding here
        return ApiError(415, f"unsupported Content-Encoding: {exc.message}", code="unsupported_content_encoding")
    if isinstance(exc, BadHttpMethod) and "HTTPS" not in exc.message:
        return ApiError(405, "unknown HTTP method")
    if isinstance(exc, HttpProcessingError):
        reason = exc.message.split("\n", 1)[0].rstrip(":")
        return ApiError(400, f"malformed HTTP request: {reason}", code="bad_http_request")
    if status == 504:
        return ApiError(504, "the request timed out", type="server_error", code="timeout")
    return ApiError(500, "internal server error")


class ApiRequestHandler(RequestHandler):
    """A connection whose HTTP-level errors answer in the API's shape (aiohttp answers them in plain text)."""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response is under way: the connection can only be dropped
            raise ConnectionError("a response was already sent; cannot send an error after it")
        if isinstance(exc, ConnectionResetError):  # the client went away (mid-body, say): nothing of ours failed
            log.info("client %s went away during %s %s", request.remote, request.method, request.path)
            resp = web.Response(status=499)  # nginx's "client closed request"; nobody is there to read it
            resp.force_close()
            return resp
        error = parser_error(status, exc)
        if error.status >= 500:
            log.error("HTTP error %d on a request from %s", error.status, request.remote, exc_info=exc)
        else:
            log.debug("rejected a malformed request from %s: %s", request.remote, exc)
        resp = error_response(error)
        resp.force_close()
        return resp


    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's own "Unhandled exception": a body the client broke (reading what is left of it after the
        answer) or a client gone away is one INFO line; the rest, our faults, stay ERRORs with a traceback."""
        exc = kw.get("exc_info")
        if isinstance(exc, (RequestPayloadError, ContentEncodingError, ConnectionResetError)):
            log.info("client connection ended: %s", str(exc).replace("\n", " "))
        else:
            super().log_exception(*args, **kw)


class _ApiServer(web.Server):
    def __call__(self) -> RequestHandler:
        return ApiRequestHandler(self, loop=self._loop, **self._kwargs)  # as web.Server does, with our class


class ApiAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections are ApiRequestHandlers, with the parser limits above."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, max_line_size=MAX_REQUEST_LINE, max_field_size=MAX_HEADER_FIELD,
                         max_headers=MAX_HEADERS, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _ApiServer(server.request_handler, request_factory=server.request_factory,
                          handler_cancellation=server.handler_cancellation, loop=server._loop, **server._kwargs)
