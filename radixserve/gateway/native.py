"""SGLang's native `POST /generate` over HTTP: the request Struct and the stream's events.

The request's fields, its split into sub-requests and the answer's shape are the front-end core's
(radixserve/native_api.py, shared with the offline Engine); this module adds what only HTTP clients send.
"""

from __future__ import annotations

from typing import Any

from radixserve import wire
from radixserve.gateway.tokenizer_client import Generation
from radixserve.native_api import NativeRequest, Output, native_result, sub_requests
from radixserve.sglang_fields import NATIVE, check_unsupported, fields_struct


class GenerateRequest(fields_struct("NativeExtras", NATIVE, NativeRequest),  # type: ignore[misc]
                      forbid_unknown_fields=True, kw_only=True):
    """SGLang's GenerateReqInput: NativeRequest's fields, and the catalogue's NATIVE fields
    (radixserve/sglang_fields.py): features this server lacks, and fields accepted with no effect (see README)."""


def build_requests(req: GenerateRequest) -> tuple[bool, list[wire.GenerateText]]:
    """(single, sub-requests): one per prompt and copy (`n`), prompt-major."""
    check_unsupported(req, NATIVE)
    return sub_requests(req)


class NativeFormat:
    """SGLang's `{text, output_ids, meta_info}`. As in SGLang, each stream event carries the output so far
    (cumulative text, ids and logprobs), so this format keeps each choice's whole output."""

    def __init__(self, single: bool, num_choices: int) -> None:
        self.single = single
        self.outputs = [Output() for _ in range(num_choices)]

    def response(self, gen: Generation, outputs: list[Output]) -> Any:
        items = [native_result(gen.reqs[i], out, gen.started) for i, out in enumerate(outputs)]
        return items[0] if self.single else items

    def events(self, gen: Generation, batch: list[tuple[int, wire.TextDelta]]) -> list[Any]:
        events = []
        for i, delta in batch:
            self.outputs[i].add(delta)
            item = native_result(gen.reqs[i], self.outputs[i], gen.started)
            events.append(item | ({} if self.single else {"index": i}))
        return events

    def head(self, gen: Generation) -> list[Any]:
        return []

    def tail(self, gen: Generation) -> list[Any]:
        return []
