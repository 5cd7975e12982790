"""SGLang's native generate, the one front-end core under the gateway's `POST /generate` and the offline Engine:
the request (NativeRequest: its fields, declared once), its split into sub-requests (one per prompt and copy),
and the answer's shape, `{text, output_ids, meta_info}` (`native_result`), so a native field is added here once.

The gateway's GenerateRequest adds what only HTTP clients send (the catalogue's unsupported fields, the router's
fields without effect); the Engine's request takes chat messages as prompts too.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from radixserve import wire
from radixserve.errors import bad_request
from radixserve.sampling_checks import parse_sampling
from radixserve.sampling_params import LogprobStart, TokenId, TopLogprobs


class NativeRequest(msgspec.Struct, kw_only=True):
    """SGLang's GenerateReqInput, the fields this server acts on. Per-prompt fields take one value or one per
    prompt. A prompt is text or token ids (and, from the Engine, chat messages: a list of message objects)."""

    text: str | list[str] | None = None
    input_ids: list[TokenId | list[TokenId]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    rid: str | list[str] | None = None  # one string for a batch: "{rid}_{i}", as SGLang
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: LogprobStart | list[LogprobStart] | None = None
    top_logprobs_num: TopLogprobs | list[TopLogprobs] | None = None
    return_text_in_logprobs: bool = False
    session_params: wire.SessionParams | None = None
    log_metrics: bool = True


def sub_requests(req: NativeRequest) -> tuple[bool, list[wire.GenerateText]]:
    """(single, sub-requests): one per prompt and copy (`n`), prompt-major; a 400 for a malformed batch."""
    single, prompts = _prompts(req)
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


def _prompts(req: NativeRequest) -> tuple[bool, list[dict[str, Any]]]:
    """(single, one prompt a sub-request: {"text"}, {"messages"} or {"input_ids"})."""
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", "text")
    if req.text is not None:
        single = isinstance(req.text, str) or _is_messages(req.text)
        texts = [req.text] if single else req.text
        prompts = [{"messages": t} if isinstance(t, list) else {"text": t} for t in texts]
    else:
        single = not req.input_ids or all(isinstance(t, int) for t in req.input_ids)
        if not single and not all(isinstance(t, list) for t in req.input_ids):
            raise bad_request("input_ids must be a list of ids or a list of lists of ids", "input_ids")
        prompts = [{"input_ids": ids} for ids in ([req.input_ids] if single else req.input_ids)]
    if not prompts:
        raise bad_request("empty batch of prompts", "text" if req.text is not None else "input_ids")
    return single, prompts


def _is_messages(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def _per_prompt(value: Any, default: Any, n: int, name: str) -> list[Any]:
    """One value per prompt from SGLang's "one, or one per prompt" fields."""
    if value is None:
        return [default] * n
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise bad_request(f"{name} must be one value or one per prompt ({n})", name)
    return value


def expand(rid: str, sp: wire.SamplingParams, prompt: dict[str, Any], **fields: Any) -> list[wire.GenerateText]:
    """`sp.n` sub-requests of one prompt; copy k gets rid `{rid}-{k}` and seed `seed + k` (if seeded)."""
    if sp.n == 1:
        return [wire.GenerateText(rid=rid, sampling=sp, **prompt, **fields)]
    return [wire.GenerateText(rid=f"{rid}-{k}", **prompt, **fields, sampling=msgspec.structs.replace(
        sp, n=1, seed=None if sp.seed is None else (sp.seed + k) % 2**63)) for k in range(sp.n)]


def unbounded(raw: dict[str, Any] | None) -> bool:
    """`max_new_tokens: null`: SGLang's "up to the context length" (GenerateText.fill_context)."""
    return isinstance(raw, dict) and "max_new_tokens" in raw and raw["max_new_tokens"] is None


class Output:
    """One sub-request's whole output, built from its deltas, for an answer that must carry all of it.

    Adding a delta costs its size: text is kept as pieces, joined when read."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self.output_ids: list[int] = []
        self.output_logprobs: list[wire.LogprobEntry] = []
        self.output_top_logprobs: list[list[wire.LogprobEntry] | None] = []
        self.input_logprobs: list[wire.LogprobEntry] | None = None
        self.input_top_logprobs: list[list[wire.LogprobEntry] | None] | None = None
        self.last: wire.TextDelta | None = None  # current counts and finish

    def add(self, delta: wire.TextDelta) -> None:
        self._text.append(delta.text)
        self.output_ids += delta.output_ids
        self.output_logprobs += delta.output_logprobs or ()
        self.output_top_logprobs += delta.output_top_logprobs or ()
        if delta.input_logprobs is not None:
            self.input_logprobs, self.input_top_logprobs = delta.input_logprobs, delta.input_top_logprobs
        self.last = delta

    @property
    def text(self) -> str:
        if len(self._text) > 1:
            self._text[:] = ["".join(self._text)]
        return self._text[0] if self._text else ""


def native_result(req: wire.GenerateText, out: Output, started: float) -> dict[str, Any]:
    """SGLang's `{text, output_ids, meta_info}` of one sub-request's output so far (`started`: its
    time.perf_counter() at submission, for e2e_latency)."""
    last = out.last
    assert last is not None
    meta: dict[str, Any] = {"id": req.rid, "prompt_tokens": last.prompt_tokens,
                            "completion_tokens": last.completion_tokens, "cached_tokens": last.cached_tokens,
                            "finish_reason": msgspec.to_builtins(last.finish),
                            "e2e_latency": round(time.perf_counter() - started, 6)}
    if last.spec is not None:  # speculative decoding (SGLang's names)
        meta.update(msgspec.structs.asdict(last.spec),
                    spec_accept_length=round(last.completion_tokens / max(last.spec.spec_verify_ct, 1), 4))
    if req.logprob is not None:
        meta.update(input_token_logprobs=out.input_logprobs, input_top_logprobs=out.input_top_logprobs,
                    output_token_logprobs=out.output_logprobs, output_top_logprobs=out.output_top_logprobs)
    return {"text": out.text, "output_ids": out.output_ids, "meta_info": meta}


def rejected_result(req: wire.GenerateText, rejected: wire.Rejected) -> dict[str, Any]:
    """A request the backend rejected (too long for the context, a session conflict), as SGLang's Engine ends it:
    an abort with its status (an HTTP route answers the status instead)."""
    finish = {"type": "abort", "message": rejected.message, "status_code": rejected.status}
    return {"text": "", "output_ids": [], "meta_info": {"id": req.rid, "prompt_tokens": 0, "completion_tokens": 0,
                                                        "cached_tokens": 0, "finish_reason": finish}}
