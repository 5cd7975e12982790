"""SGLang's native `POST /generate`: the request Struct, its validation, and the response shape.

Sampling values are range-checked in `validation.check_sampling`, shared with the OpenAI routes.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from msgspec import Meta

from radixserve import wire
from radixserve.errors import bad_request
from radixserve.gateway.sglang_fields import NativeUnsupported, Priority, check_unsupported
from radixserve.gateway.tokenizer_client import Generation, Output
from radixserve.gateway.validation import (
    INT32_MAX,
    MAX_TOP_LOGPROBS,
    TokenId,
    expand,
    parse_sampling,
    unbounded,
)

LogprobStart = Annotated[int, Meta(ge=-1, le=INT32_MAX)]
TopLogprobsNum = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]
Timestamp = Annotated[float, Meta(ge=0, le=1e12)]  # seconds since the epoch (SGLang's router's stamps)


class GenerateRequest(NativeUnsupported, forbid_unknown_fields=True, kw_only=True):
    """SGLang's GenerateReqInput. Per-prompt fields take one value or one per prompt; features this server lacks
    are NativeUnsupported's fields; the rest are accepted and have no effect here (see README)."""

    text: str | list[str] | None = None
    input_ids: list[TokenId | list[TokenId]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    rid: str | list[str] | None = None  # one string for a batch: "{rid}_{i}", as SGLang
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: LogprobStart | list[LogprobStart] | None = None
    top_logprobs_num: TopLogprobsNum | list[TopLogprobsNum] | None = None
    return_text_in_logprobs: bool = False
    session_params: wire.SessionParams | None = None
    log_metrics: bool = True
    # accepted, no effect here
    model: str | None = None  # SGLang's router adds it; any name
    session_id: str | None = None  # a stable id for routing and tracing (session_params is what continues one)
    priority: Priority | None = None  # as SGLang without --enable-priority-scheduling
    no_logs: bool = False
    custom_labels: dict[str, str] | None = None
    conversation_id: str | None = None
    routing_key: str | None = None
    received_time: Timestamp | None = None
    validation_time: Timestamp | None = None
    external_trace_header: dict[str, Any] | None = None
    http_worker_ipc: str | None = None


def _per_prompt(value: Any, default: Any, n: int, name: str) -> list[Any]:
    """One value per prompt from SGLang's "one, or one per prompt" fields."""
    if value is None:
        return [default] * n
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise bad_request(f"{name} must be one value or one per prompt ({n})", name)
    return value


def build_requests(req: GenerateRequest) -> tuple[bool, list[wire.GenerateText]]:
    """(single, sub-requests): one per prompt and copy (`n`), prompt-major."""
    check_unsupported(req)
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", "text")
    prompts: list[dict[str, Any]]
    if req.text is not None:
        single = isinstance(req.text, str)
        prompts = [{"text": t} for t in ([req.text] if single else req.text)]
    else:
        single = not req.input_ids or all(isinstance(t, int) for t in req.input_ids)
        if not single and not all(isinstance(t, list) for t in req.input_ids):
            raise bad_request("input_ids must be a list of ids or a list of lists of ids", "input_ids")
        prompts = [{"input_ids": ids} for ids in ([req.input_ids] if single else req.input_ids)]
    if not prompts:
        raise bad_request("empty batch of prompts", "text" if req.text is not None else "input_ids")
    n = len(prompts)
    params = req.sampling_params if isinstance(req.sampling_params, list) else [req.sampling_params] * n
    if len(params) != n:
        raise bad_request("sampling_params must be one object or one per prompt", "sampling_params")
    if isinstance(req.rid, str):
        rids = [req.rid] if n == 1 else [f"{req.rid}_{i}" for i in range(n)]
    else:
        rids = _per_prompt(req.rid, None, n, "rid")
    wants = _per_prompt(req.return_logprob, False, n, "return_logprob")
    starts = _per_prompt(req.logprob_start_len, -1, n, "logprob_start_len")
    tops = _per_prompt(req.top_logprobs_num, 0, n, "top_logprobs_num")
    out = []
    for i, (prompt, raw) in enumerate(zip(prompts, params, strict=True)):
        sp = parse_sampling(raw)
        logprob = wire.LogprobRequest(starts[i], tops[i]) if wants[i] else None
        out += expand(rids[i] or uuid.uuid4().hex, sp, prompt, stream=req.stream, logprob=logprob,
                      return_text_in_logprobs=req.return_text_in_logprobs, session=req.session_params,
                      fill_context=unbounded(raw), log_metrics=req.log_metrics)
    return single and len(out) == 1, out


class NativeFormat:
    """SGLang's `{text, output_ids, meta_info}`. As in SGLang, each stream event carries the output so far
    (cumulative text, ids and logprobs), so this format keeps each choice's whole output."""

    def __init__(self, single: bool, num_choices: int) -> None:
        self.single = single
        self.outputs = [Output() for _ in range(num_choices)]

    def response(self, gen: Generation, outputs: list[Output]) -> Any:
        items = [self._item(gen, i, out) for i, out in enumerate(outputs)]
        return items[0] if self.single else items

    def events(self, gen: Generation, batch: list[tuple[int, wire.TextDelta]]) -> list[Any]:
        events = []
        for i, delta in batch:
            self.outputs[i].add(delta)
            events.append(self._item(gen, i, self.outputs[i]) | ({} if self.single else {"index": i}))
        return events

    def head(self, gen: Generation) -> list[Any]:
        return []

    def tail(self, gen: Generation) -> list[Any]:
        return []

    @staticmethod
    def _item(gen: Generation, i: int, out: Output) -> dict[str, Any]:
        last = out.last
        assert last is not None
        meta: dict[str, Any] = {"id": gen.reqs[i].rid, "prompt_tokens": last.prompt_tokens,
                                "completion_tokens": last.completion_tokens, "cached_tokens": last.cached_tokens,
                                "finish_reason": last.finish, "e2e_latency": round(gen.elapsed(), 6)}
        if gen.reqs[i].logprob is not None:
            meta.update(input_token_logprobs=out.input_logprobs, input_top_logprobs=out.input_top_logprobs,
                        output_token_logprobs=out.output_logprobs, output_top_logprobs=out.output_top_logprobs)
        return {"text": out.text, "output_ids": out.output_ids, "meta_info": meta}
