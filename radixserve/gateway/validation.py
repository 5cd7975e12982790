"""Request validation shared by the native and OpenAI routes and the offline Engine: limits, the one
range check of sampling values (`check_sampling`), and the split of a request into `n` sub-requests."""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from radixserve import wire
from radixserve.errors import bad_request, from_validation

INT32_MAX = 2**31 - 1
MAX_N = 64
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20

TokenId = Annotated[int, Meta(ge=0, le=INT32_MAX)]


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


def expand(rid: str, sp: wire.SamplingParams, prompt: dict[str, Any], **fields: Any) -> list[wire.GenerateText]:
    """`sp.n` sub-requests of one prompt; copy k gets rid `{rid}-{k}` and seed `seed + k` (if seeded)."""
    if sp.n == 1:
        return [wire.GenerateText(rid=rid, sampling=sp, **prompt, **fields)]
    return [wire.GenerateText(rid=f"{rid}-{k}", **prompt, **fields, sampling=msgspec.structs.replace(
        sp, n=1, seed=None if sp.seed is None else (sp.seed + k) % 2**63)) for k in range(sp.n)]
