"""The OpenAPI 3.1 description of the gateway, generated from the msgspec Structs its routes decode.

`document()` walks the app's router and describes each route with its `Operation` (summary, request and
response Structs, whether it needs the API key); the schemas come from `msgspec.json.schema_components`, so
a field added to a request Struct is described as it is parsed, bounds included. tests/test_openapi.py checks
that every route of the router has an Operation (one without is served as "undocumented" rather than failing
the document) and that every request schema round-trips through its Struct.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from radixserve import __version__

REF = "#/components/schemas/{name}"
JSON = "application/json"


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """Every error, at every layer: OpenAI's error object (radixserve.errors.ApiError.body)."""

    error: ErrorDetail


@dataclass(frozen=True)
class Operation:
    summary: str
    request: type | None = None  # the Struct the JSON body decodes to; None: no body is read
    response: type | None = None  # the 200 body's Struct, where it has one
    response_type: str = JSON  # the 200 body's media type
    streams: bool = False  # may answer text/event-stream (a request with "stream": true)
    public: bool = False  # needs no API key


UNDOCUMENTED = Operation("undocumented")


def document(router: web.UrlDispatcher, operations: Mapping[tuple[str, str], Operation]) -> dict[str, Any]:
    """The OpenAPI document of the routes of `router` (HEAD, which aiohttp adds to each GET, is left out)."""
    routes = sorted({(r.method, r.resource.canonical) for r in router.routes()
                     if r.method != "HEAD" and r.resource is not None}, key=lambda mp: (mp[1], mp[0]))
    types = {t for op in operations.values() for t in (op.request, op.response) if t is not None}
    refs, components = msgspec.json.schema_components(sorted({ErrorResponse, *types}, key=lambda t: t.__name__),
                                                     ref_template=REF)
    ref_of = dict(zip(sorted({ErrorResponse, *types}, key=lambda t: t.__name__), refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for method, path in routes:
        op = operations.get((method, path), UNDOCUMENTED)
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, op, ref_of)
    return {
        "openapi": "3.1.0",
        "info": {"title": "radixserve", "version": __version__,
                 "description": "SGLang's native API and the OpenAI API. Errors are OpenAI's error object."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "only when the server runs with --api-key"}}},
        "security": [{"bearer": []}],
    }


def _operation(method: str, path: str, op: Operation, ref_of: dict[type, dict]) -> dict[str, Any]:
    ok: dict[str, Any] = {op.response_type: {"schema": ref_of[op.response] if op.response else {}}}
    if op.streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_').replace('.', '_')}",
        "responses": {"200": {"description": "OK", "content": ok},
                      "default": {"description": "an error", "content": {JSON: {"schema": ref_of[ErrorResponse]}}}},
    }
    if op.request is not None:
        out["requestBody"] = {"required": True, "content": {JSON: {"schema": ref_of[op.request]}}}
    if op.public:
        out["security"] = []
    return out
