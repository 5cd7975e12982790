"""/openapi.json stays true: every route of the gateway's router is described, every number a request may carry
(integer or float, native sampling_params included) has both bounds, the document is a valid OpenAPI 3.1
description, and every request schema round-trips through its msgspec Struct (what the schema allows decodes;
what decodes re-encodes to something the schema allows).
The gateway's app is built in-process: the router and the Structs are all these tests need."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation import GenerationMode

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.gateway import openapi
from radixserve.gateway.app import OPERATIONS, Gateway


@pytest.fixture(scope="module")
def app() -> Any:
    return Gateway(ServerArgs(), None, "", "test-model", []).app()  # type: ignore[arg-type]  # no backend needed


@pytest.fixture(scope="module")
def doc(app: Any) -> dict:
    return openapi.document(app.router, OPERATIONS)


def test_every_route_is_described(app: Any, doc: dict) -> None:
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    described = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert routes == described
    assert {(m.lower(), p) for m, p in OPERATIONS} == described, "an Operation for a route that does not exist"


def test_a_route_without_an_operation_is_still_served(app: Any) -> None:
    doc = openapi.document(app.router, {k: v for k, v in OPERATIONS.items() if k[1] != "/generate"})
    assert doc["paths"]["/generate"]["post"]["summary"] == "undocumented"


def test_document_is_valid_openapi(doc: dict) -> None:
    schema = schemathesis.openapi.from_dict(doc)
    assert len([r.ok() for r in schema.get_all_operations()]) == len(OPERATIONS)
    assert msgspec.json.decode(msgspec.json.encode(doc)) == doc  # plain JSON, nothing lost on the way out
    for component in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(component)


def _numbers(node: Any, where: str) -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number"):
            yield where, node
        for key, value in node.items():
            yield from _numbers(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, f"{where}[{i}]")


def test_every_request_number_has_bounds(doc: dict) -> None:
    """A request integer without bounds could pass validation and then fail to cross the wire (2**64); a float
    without them could reach a worker as 1e39 or NaN, past what a float32 tensor holds."""
    requests = {op.request.__name__ for op in OPERATIONS.values() if op.request is not None}
    # /generate's sampling_params is an object the route parses as SamplingParams: its schema counts too.
    _, sampling = msgspec.json.schema_components([wire.SamplingParams])
    components = doc["components"]["schemas"] | sampling
    reachable, todo = set(), [*requests, "SamplingParams"]
    while todo:  # the request Structs and every Struct they refer to
        name = todo.pop()
        if name not in reachable:
            reachable.add(name)
            todo += [ref.rsplit("/", 1)[1] for ref in _refs(components[name])]
    found = [(f"{name}{where}", node) for name in sorted(reachable) for where, node in _numbers(components[name], "")]
    assert len(found) >= 15, found  # the walk sees them: input_ids, max_tokens, n, seed, offset...
    floats = {where for where, node in found if node["type"] == "number"}
    assert {"SamplingParams.properties.temperature", "OpenSessionRequest.properties.timeout.anyOf[0]"} <= floats, floats
    unbounded = [where for where, node in found
                 if not ({"minimum", "exclusiveMinimum"} & node.keys()
                         and {"maximum", "exclusiveMaximum"} & node.keys())]
    assert not unbounded, f"request numbers without both bounds: {unbounded}"
    assert all(node.get("maximum", 0) < 2**64 for _, node in found)
    float32_max = 3.4028234663852886e38
    assert all(abs(node.get(k, 0)) < float32_max for _, node in found if node["type"] == "number"
               for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


@pytest.mark.parametrize("key", [k for k, op in OPERATIONS.items() if op.request is not None], ids=lambda k: k[1])
def test_request_schema_round_trips(doc: dict, key: tuple[str, str]) -> None:
    method, path = key
    struct = OPERATIONS[key].request
    decoder = msgspec.json.Decoder(struct)
    schema = {**doc["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]["schema"],
              "components": doc["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    operation = schemathesis.openapi.from_dict(doc)[path][method]

    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    @settings(max_examples=40, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def round_trip(case: Any) -> None:
        validator.validate(case.body)  # the generator keeps to the schema
        # the schema allows it: the Struct parses it (JSON Schema counts 3.0 as an integer; JSON writes it 3)
        decoded = decoder.decode(msgspec.json.encode(_integral_floats_as_ints(case.body)))
        validator.validate(msgspec.json.decode(msgspec.json.encode(decoded)))  # and it encodes back inside the schema

    round_trip()


def _integral_floats_as_ints(node: Any) -> Any:
    if isinstance(node, float) and node.is_integer():
        return int(node)
    if isinstance(node, dict):
        return {k: _integral_floats_as_ints(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_integral_floats_as_ints(v) for v in node]
    return node
