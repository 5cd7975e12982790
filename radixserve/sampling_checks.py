"""Parsing and checking a request's sampling values, for every front end (the gateway's routes and the offline
Engine): SGLang's `sampling_params` object (`parse_sampling`), and the one range check of SamplingParams built
field by field (`check_sampling`). Workers and the scheduler trust what passes.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from radixserve.errors import bad_request, from_validation
from radixserve.sampling_params import (
    GRAMMAR_KINDS,
    INT32_MAX,
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_STOPS,
    SamplingParams,
)
from radixserve.sglang_fields import pop_unsupported_sampling


def check_sampling(sp: SamplingParams, prefix: str = "sampling_params.") -> None:
    """Raise a 400 naming the first value out of range (workers and the scheduler trust these), for
    SamplingParams built field by field (the OpenAI routes): its fields' declared bounds, then `_check_relations`."""
    try:
        msgspec.convert(msgspec.to_builtins(sp), SamplingParams)
    except msgspec.ValidationError as e:
        raise from_validation(e, prefix) from None
    _check_relations(sp, prefix)


def _check_relations(sp: SamplingParams, prefix: str) -> None:
    """What the field types cannot say alone: limits between fields, counts, the forms of keys and patterns."""
    checks = [
        ("min_new_tokens", sp.min_new_tokens <= sp.max_new_tokens, "must be in [0, max_new_tokens]"),
        ("top_k", sp.top_k == -1 or sp.top_k >= 1, "must be -1 (off) or >= 1"),
        ("n", sp.n <= MAX_N, f"must be in [1, {MAX_N}]"),
        ("stop", len(sp.stop) <= MAX_STOPS, f"at most {MAX_STOPS} stop strings"),
        ("logit_bias", len(sp.logit_bias) <= MAX_LOGIT_BIAS and all(
            k.isdigit() and int(k) <= INT32_MAX for k in sp.logit_bias),
         f"must map at most {MAX_LOGIT_BIAS} token ids to numbers"),
        ("stop_regex", len(sp.stop_regex) <= MAX_STOPS, f"at most {MAX_STOPS} patterns"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise bad_request(f"{prefix}{name} {why}, got {getattr(sp, name)!r}", prefix + name)
    for pattern in sp.stop_regex:
        try:
            re.compile(pattern)
        except re.error as e:
            raise bad_request(f"{prefix}stop_regex {pattern!r} is not a regular expression: {e}",
                              prefix + "stop_regex") from None
    _check_grammar(sp, prefix)


def _check_grammar(sp: SamplingParams, prefix: str) -> None:
    """At most one constraint, and JSON where JSON is expected (xgrammar checks the rest as it compiles)."""
    given = [kind for kind in GRAMMAR_KINDS if getattr(sp, kind) is not None]
    if len(given) > 1:
        raise bad_request(f"give at most one of {', '.join(GRAMMAR_KINDS)}; got {', '.join(given)}",
                          prefix + given[1])
    for kind in ("json_schema", "structural_tag"):
        source = getattr(sp, kind)
        if source is not None and not (kind == "json_schema" and source == ANY_JSON):
            try:
                json.loads(source)
            except ValueError as e:
                raise bad_request(f"{prefix}{kind} is not valid JSON: {e}", prefix + kind) from None


ANY_JSON = "$$ANY$$"  # SGLang's json_schema for "any JSON value"


def parse_sampling(raw: dict[str, Any] | None, prefix: str = "sampling_params.") -> SamplingParams:
    """SGLang's `sampling_params` object as SamplingParams: null means the default, as in SGLang (see
    `unbounded` for max_new_tokens), `stop` / `stop_regex` may be one string, `sampling_seed` is `seed`."""
    raw = {k: v for k, v in (raw or {}).items() if v is not None}
    for name in ("stop", "stop_regex"):
        if isinstance(raw.get(name), str):
            raw[name] = [raw[name]]
    pop_unsupported_sampling(raw, prefix)
    if "sampling_seed" in raw:
        seed = raw.pop("sampling_seed")
        if raw.setdefault("seed", seed) != seed:
            raise bad_request("give one of seed and sampling_seed", prefix + "sampling_seed")
    try:
        sp = msgspec.convert(raw, SamplingParams)
    except msgspec.ValidationError as e:
        raise from_validation(e, prefix) from None
    _check_relations(sp, prefix)
    return sp
