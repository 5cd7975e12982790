"""SGLang's native `POST /generate`: the request Struct, its validation, and the response shape.

Sampling values are range-checked in `validation.check_sampling`, shared with the OpenAI routes.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from radixserve import wire
from radixserve.errors import bad_request
from radixserve.gateway.tokenizer_client import Generation, Output
from radixserve.gateway.validation import INT32_MAX, MAX_TOP_LOGPROBS, TokenId, expand, parse_sampling


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: str | list[str] | None = None
    input_ids: list[TokenId | list[TokenId]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    rid: str | list[str] | None = None
    return_logprob: bool = False
    logprob_start_len: Annotated[int, Meta(ge=-1, le=INT32_MAX)] = -1
    top_logprobs_num: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] = 0
    return_text_in_logprobs: bool = False
    session_params: wire.SessionParams | None = None


def build_requests(req: GenerateRequest) -> tuple[bool, list[wire.GenerateText]]:
    """(single, sub-requests): one per prompt and copy (`n`), prompt-major."""
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
    params = req.sampling_params if isinstance(req.sampling_params, list) else [req.sampling_params] * len(prompts)
    if len(params) != len(prompts):
        raise bad_request("sampling_params must be one object or one per prompt", "sampling_params")
    rids = [req.rid] if isinstance(req.rid, str) else req.rid
    if rids is not None and len(rids) != len(prompts):
        raise bad_request("rid must be one string per prompt", "rid")
    logprob = wire.LogprobRequest(req.logprob_start_len, req.top_logprobs_num) if req.return_logprob else None
    out = []
    for i, (prompt, raw) in enumerate(zip(prompts, params, strict=True)):
        sp = parse_sampling(raw)
        out += expand(rids[i] if rids else uuid.uuid4().hex, sp, prompt, stream=req.stream, logprob=logprob,
                      return_text_in_logprobs=req.return_text_in_logprobs, session=req.session_params)
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
