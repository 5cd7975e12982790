"""The catalogue of SGLang (and OpenAI) request fields of features this server lacks: images, LoRA, hidden states,
disaggregation... declared once here, with the request kinds that carry each and the feature it belongs to.

They are part of the request Structs (`fields_struct` builds a request's base from this catalogue), so that what
SGLang's clients and router send decodes, and a typo is still an unknown field (a 400). Each is accepted at its
default (or null) and answered with a 400 naming it otherwise (`check_unsupported`); inside SGLang's
`sampling_params` object the same holds for the SAMPLING ones (`pop_unsupported_sampling`). The fields come from
SGLang 0.5.5 to 0.5.23 (`GenerateReqInput`, `ChatCompletionRequest`, `CompletionRequest`, `SamplingParams`) and
OpenAI's chat and Responses APIs; README's API section lists them with the fields that are implemented.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from radixserve.errors import bad_request
from radixserve.sampling_params import Count, TopLogprobs

# The request kinds, as letters in Missing.where.
NATIVE = "N"  # /generate and the offline Engine (GenerateReqInput)
OPENAI = "O"  # /v1/chat/completions and /v1/completions (both routes know all of them)
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
CATALOGUE: dict[str, list[Missing]] = {  # the feature this server lacks (why the field is unsupported) -> its fields
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


def missing(kind: str) -> list[Missing]:
    """The catalogue's fields of one request kind."""
    return [m for fields in CATALOGUE.values() for m in fields if kind in m.where]


def fields_struct(name: str, kind: str, base: type = msgspec.Struct) -> type:
    """A Struct with the catalogue's fields of `kind` (on `base`), for a request Struct to derive from."""
    return msgspec.defstruct(name, [(m.name, m.type, m.default) for m in missing(kind)], bases=(base,),
                             kw_only=True, module=__name__)


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
