"""The catalogue of SGLang (and OpenAI) request fields beyond what this server acts on, declared once here with the
request kinds that carry each and why:
- UNSUPPORTED: fields of features this server lacks (images, LoRA, hidden states, disaggregation...). Each is
  accepted at its default (or null) and answered with a 400 naming it otherwise (`check_unsupported`); inside
  SGLang's `sampling_params` object the same holds for the SAMPLING ones (`pop_unsupported_sampling`).
- NO_EFFECT: fields accepted as they come, with no effect here (routing and tracing for SGLang's router, OpenAI's
  storage and cache keys...).
The supported fields are the request Structs' own (radixserve/native_api.py's NativeRequest, the gateway's
openai_api.py and responses_api.py). Both lists are part of the request Structs (`fields_struct` builds a request's
base from them), so that what SGLang's clients and router send decodes, and a typo is still an unknown field (a
400). The fields come from SGLang 0.5.5 to 0.5.23 (`GenerateReqInput`, `ChatCompletionRequest`,
`CompletionRequest`, `SamplingParams`) and OpenAI's chat and Responses APIs; README's API section lists them with
the fields that are implemented.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import msgspec

from radixserve.errors import bad_request
from radixserve.sampling_params import Count, PositiveCount, Priority, Timestamp, TopLogprobs

# The request kinds, as letters in Missing.where and NoEffect.where.
NATIVE = "N"  # /generate (GenerateReqInput)
OPENAI = "O"  # /v1/chat/completions and /v1/completions (both routes know all of them)
CHAT = "C"  # /v1/chat/completions only (for fields with no effect: an unsupported one goes under OPENAI)
RESPONSES = "R"  # /v1/responses
SAMPLING = "S"  # inside `sampling_params`
FLAG = bool | None
_UNSET = object()
NOT_STORED = "responses are not stored: send the whole conversation as input"


class Missing(NamedTuple):
    """One field of a feature this server lacks, in the requests named by `where`."""

    name: str
    where: str
    type: Any = Any
    default: Any = None
    also: Any = _UNSET  # a value accepted beside the default (it asks for what this server does anyway)
    advice: str | None = None  # the 400's advice, where there is more to say than "leave it out"


M = Missing
UNSUPPORTED: dict[str, list[Missing]] = {  # the feature this server lacks (why the field is unsupported) -> its fields
    "multimodal input": [
        M("input_embeds", "N"), M("image_data", "N"), M("video_data", "N"), M("audio_data", "N"),
        M("mm_hashes", "N"), M("mm_content_hashes", "N"), M("use_audio_in_video", "NO", FLAG, False),
        M("video_config", "NO"), M("modalities", "NO", also=["text"]),  # text: the one output modality
        M("max_dynamic_patch", "NO"), M("min_dynamic_patch", "NO"), M("image_max_dynamic_patch", "N"),
        M("video_max_dynamic_patch", "N"), M("images_config", "NO"), M("mm_processor_kwargs", "NO"),
        M("need_wait_for_mm_inputs", "N"), M("num_items_assigned", "N"), M("encoder_urls", "N"),
        M("audio", "O"),  # OpenAI's audio output
    ],
    "LoRA adapters": [M("lora_path", "NO"), M("lora_id", "N")],
    "outputs this server does not compute": [
        M("token_ids_logprob", "N"),
        M("return_hidden_states", "N", Any, False), M("return_hidden_states", "O", FLAG, False),
        M("return_routed_experts", "NO", FLAG, False), M("routed_experts_start_len", "NO", Count | None, 0),
        M("return_indexer_topk", "N", FLAG, False), M("return_entropy", "N", FLAG, False),
        M("return_bytes", "N", FLAG, False), M("return_prompt_token_ids", "NO", FLAG, False),
        M("return_sampling_mask", "N"), M("return_sampling_mask", "O", FLAG, False),
        M("sampling_logprobs_mode", "NO"), M("return_flat_raw_top_logprobs", "N", FLAG, False),
        M("return_flat_raw_output_top_logprobs", "NO", FLAG, False),
        M("return_flat_raw_top_logprobs_b64", "NO", FLAG, False),
        M("multi_item_delimiter_indices", "N"), M("token_indices_to_pool", "N"),
        M("return_spec_tokens_details", "O", FLAG, False), M("return_token_ids", "O", FLAG, False),
        M("return_meta_info", "O", FLAG, False), M("return_input_ids_in_sglext", "O", FLAG, False),
        M("return_output_ids_in_sglext", "O", FLAG, False),
        M("include", "R", list[str] | None, also=[]),  # logprobs, encrypted reasoning...
        M("top_logprobs", "R", TopLogprobs | None, also=0),
    ],
    "sampling extensions": [
        M("custom_logit_processor", "NO"), M("positional_embed_overrides", "N"), M("watermark", "NOS"),
        M("require_reasoning", "N", FLAG, False), M("max_thinking_tokens", "N"), M("thinking", "O"),
        M("beam_width", "S", default=1),
    ],
    "cache namespaces (a salted prefix would not share the radix cache)": [M("extra_key", "NO"), M("cache_salt", "NO")],
    "disaggregated prefill/decode, data parallelism, external KV stores": [
        M("bootstrap_host", "NO"), M("bootstrap_port", "NO"), M("bootstrap_room", "NO"), M("bootstrap_pair_key", "N"),
        M("decode_tp_size", "N"), M("disagg_prefill_dp_rank", "N"), M("kv_router_hint", "N"), M("kv_hints", "N"),
        M("data_parallel_rank", "NO", Count | None, also=0),  # 0: the one data-parallel rank there is
        M("routed_dp_rank", "N", Count | None, also=0),
    ],
    "chat input other than messages": [M("task", "O"), M("input_ids", "O")],
    # OpenAI's chat fields for web search, moderation and the pre-tools function calling (use tools)
    "built-in tools and the pre-tools function calling": [
        M("web_search_options", "O"), M("moderation", "O"), M("functions", "O"), M("function_call", "O"),
    ],
    "completion suffixes (insertion)": [M("suffix", "O")],
    "stored responses and prompts": [
        M("background", "NR", FLAG, False),
        M("previous_response_id", "R", str | None, advice=NOT_STORED),
        M("conversation", "R", advice=NOT_STORED),
        M("prompt", "R"),  # OpenAI's stored prompt templates
    ],
}


class NoEffect(NamedTuple):
    """A field accepted as it comes, with no effect here, in the requests named by `where`."""

    name: str
    where: str
    type: Any = str | None
    default: Any = None


N = NoEffect
OPENAIS = "values that are OpenAI's to extend, so they are not checked beyond their type"
NO_EFFECT: dict[str, list[NoEffect]] = {  # why the fields have no effect here -> the fields
    "routing, tracing and logging for SGLang's router and front ends: one replica here, its own metrics": [
        N("model", "N"),  # SGLang's router adds it to /generate; any name (the OpenAI routes check theirs)
        N("session_id", "NO"),  # a stable id for routing and tracing (session_params is what continues one)
        N("custom_labels", "NO", dict[str, str] | None), N("no_logs", "N", bool, False), N("conversation_id", "N"),
        N("routing_key", "N"), N("received_time", "N", Timestamp | None), N("validation_time", "N", Timestamp | None),
        N("external_trace_header", "N", dict[str, Any] | None), N("http_worker_ipc", "N"), N("user", "OR"),
        N("safety_identifier", "CR"),
    ],
    "priority scheduling (none here: as SGLang without --enable-priority-scheduling)": [
        N("priority", "NOR", Priority | None),
    ],
    f"OpenAI's storage, tiers and cache keys: nothing is stored, there is one tier, the radix cache needs no key or "
    f"policy ({OPENAIS})": [
        N("store", "CR", bool | None), N("metadata", "CR", dict[str, str] | None), N("service_tier", "CR"),
        N("prompt_cache_key", "CR"), N("prompt_cache_retention", "CR"),
        N("prompt_cache_options", "C", dict[str, Any] | None),
    ],
    f"OpenAI's decoding hints: a prediction only speeds up OpenAI's decoding, the output is the same ({OPENAIS})": [
        N("prediction", "C", dict[str, Any] | None), N("verbosity", "C"),
    ],
    "built-in tools (none here) and what the Responses API does anyway": [
        N("truncation", "R", Literal["auto", "disabled"] | None),  # a prompt over the context is a 400 either way
        N("max_tool_calls", "R", PositiveCount | None),  # for built-in tools
        N("stream_options", "R", dict[str, Any] | None),  # include_obfuscation: nothing is obfuscated here
    ],
}


def missing(kind: str) -> list[Missing]:
    """The unsupported fields of one request kind."""
    return [m for fields in UNSUPPORTED.values() for m in fields if kind in m.where]


def no_effect(kind: str) -> list[NoEffect]:
    """The fields of one request kind accepted with no effect."""
    return [f for fields in NO_EFFECT.values() for f in fields if kind in f.where]


def fields_struct(name: str, kind: str, base: type = msgspec.Struct) -> type:
    """A Struct with the catalogue's fields of `kind` (on `base`), for a request Struct to derive from."""
    fields = [(f.name, f.type, f.default) for f in [*missing(kind), *no_effect(kind)]]
    return msgspec.defstruct(name, fields, bases=(base,), kw_only=True, module=__name__)


def check_unsupported(req: object, kind: str) -> None:
    """A 400 naming the first field of a missing feature that is set to something other than its default."""
    for m in missing(kind):
        value = getattr(req, m.name)
        if value is not None and value != m.default and value != (m.default if m.also is _UNSET else m.also):
            why = m.advice or f"leave it out or at its default, {m.default!r}"
            raise bad_request(f"{m.name} is not supported by this server ({why})", m.name)


def pop_unsupported_sampling(raw: dict[str, Any], prefix: str) -> None:
    """Take SAMPLING's fields out of a `sampling_params` object; a 400 naming one set to other than its default."""
    for m in missing(SAMPLING):
        if raw.pop(m.name, None) not in (None, m.default):
            raise bad_request(f"{prefix}{m.name} is not supported by this server (leave it out)", prefix + m.name)
