"""SGLang's native `POST /generate`: the request Struct, its validation, and the response shape.

Also `check_sampling`, the one place where sampling values are range-checked (the OpenAI
routes build a `wire.SamplingParams` too and pass it here).
"""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from radixserve import wire
from radixserve.errors import bad_request, from_validation
from radixserve.gateway import Generation

INT32_MAX = 2**31 - 1
MAX_N = 64
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20

TokenId = Annotated[int, Meta(ge=0, le=INT32_MAX)]


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


def check_sampling(sp: wire.SamplingParams, prefix: str = "sampling_params.") -> None:
    """Raise a 400 naming the first out-of-range value (workers and the scheduler trust these)."""
    checks = [
        ("max_new_tokens", 0 <= sp.max_new_tokens <= INT32_MAX, "must be >= 0"),
        ("min_new_tokens", 0 <= sp.min_new_tokens <= sp.max_new_tokens, "must be in [0, max_new_tokens]"),
        ("temperature", math.isfinite(sp.temperature) and sp.temperature >= 0, "must be >= 0"),
        ("top_p", 0 < sp.top_p <= 1, "must be in (0, 1]"),
        ("top_k", sp.top_k == -1 or 1 <= sp.top_k <= INT32_MAX, "must be -1 (off) or >= 1"),
        ("min_p", 0 <= sp.min_p <= 1, "must be in [0, 1]"),
        ("n", 1 <= sp.n <= MAX_N, f"must be in [1, {MAX_N}]"),
        ("seed", sp.seed is None or 0 <= sp.seed < 2**63, "must be in [0, 2**63)"),
        ("stop", len(sp.stop) <= MAX_STOPS, f"at most {MAX_STOPS} stop strings"),
        ("stop_token_ids", all(0 <= t <= INT32_MAX for t in sp.stop_token_ids), "must be token ids"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise bad_request(f"{prefix}{name} {why}, got {getattr(sp, name)!r}", prefix + name)


def parse_sampling(raw: dict[str, Any] | None, prefix: str = "sampling_params.") -> wire.SamplingParams:
    raw = dict(raw or {})
    if isinstance(raw.get("stop"), str):
        raw["stop"] = [raw["stop"]]
    try:
        sp = msgspec.convert(raw, wire.SamplingParams)
    except msgspec.ValidationError as e:
        raise from_validation(e, prefix) from None
    check_sampling(sp, prefix)
    return sp


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


def expand(rid: str, sp: wire.SamplingParams, prompt: dict[str, Any], **fields: Any) -> list[wire.GenerateText]:
    """`sp.n` sub-requests of one prompt; copy k gets rid `{rid}-{k}` and seed `seed + k` (if seeded)."""
    if sp.n == 1:
        return [wire.GenerateText(rid=rid, sampling=sp, **prompt, **fields)]
    return [wire.GenerateText(rid=f"{rid}-{k}", **prompt, **fields, sampling=msgspec.structs.replace(
        sp, n=1, seed=None if sp.seed is None else (sp.seed + k) % 2**63)) for k in range(sp.n)]


class NativeFormat:
    """SGLang's `{text, output_ids, meta_info}`; cumulative text in each stream event."""

    def __init__(self, single: bool) -> None:
        self.single = single

    def response(self, gen: Generation, results: list[wire.TextChunk]) -> Any:
        items = [self._item(gen, i, c) for i, c in enumerate(results)]
        return items[0] if self.single else items

    def events(self, gen: Generation, batch: list[tuple[int, wire.TextChunk]]) -> list[Any]:
        return [self._item(gen, i, c) | ({} if self.single else {"index": i}) for i, c in batch]

    def head(self, gen: Generation) -> list[Any]:
        return []

    def tail(self, gen: Generation) -> list[Any]:
        return []

    @staticmethod
    def _item(gen: Generation, i: int, chunk: wire.TextChunk) -> dict[str, Any]:
        meta = {"id": gen.reqs[i].rid, **chunk.meta, "e2e_latency": round(gen.elapsed(), 6)}
        return {"text": chunk.text, "output_ids": chunk.output_ids, "meta_info": meta}
