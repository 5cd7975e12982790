"""SGLang request fields of features this server does not have (images, LoRA, hidden states, disaggregation...).

They are part of the request Structs, so that what SGLang's clients and router send decodes, and a typo is still
an unknown field (a 400). Each is accepted at its default (or null) and answered with a 400 naming it otherwise
(`check_unsupported`). The fields come from SGLang 0.5.5 to 0.5.23 (`GenerateReqInput`, `ChatCompletionRequest`,
`CompletionRequest`) and OpenAI's chat and Responses APIs; README's API section lists them with the fields that
are implemented.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from radixserve.errors import bad_request

Priority = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]  # SGLang's range; no priority scheduling here
Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]
# the one data-parallel rank there is; text, the one output modality; no extra outputs
ALSO_ACCEPTED = {"data_parallel_rank": 0, "routed_dp_rank": 0, "modalities": ["text"], "include": [],
                 "top_logprobs": 0}
NOT_STORED = "responses are not stored: send the whole conversation as input"
WHY = {"previous_response_id": NOT_STORED, "conversation": NOT_STORED}  # the 400's advice where there is more to say


class _Unsupported(msgspec.Struct, kw_only=True):
    """Fields of features this server lacks; every field of a subclass named in UNSUPPORTED is checked."""


class NativeUnsupported(_Unsupported, kw_only=True):
    """`/generate` (GenerateReqInput) fields of features this server lacks."""

    # multimodal input
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    mm_hashes: Any = None
    mm_content_hashes: Any = None
    use_audio_in_video: bool | None = False
    video_config: Any = None
    modalities: Any = None
    max_dynamic_patch: Any = None
    min_dynamic_patch: Any = None
    image_max_dynamic_patch: Any = None
    video_max_dynamic_patch: Any = None
    images_config: Any = None
    mm_processor_kwargs: Any = None
    need_wait_for_mm_inputs: Any = None
    num_items_assigned: Any = None
    encoder_urls: Any = None
    # LoRA adapters
    lora_path: Any = None
    lora_id: Any = None
    # outputs this server does not compute
    token_ids_logprob: Any = None
    return_hidden_states: Any = False
    return_routed_experts: bool | None = False
    routed_experts_start_len: Count | None = 0
    return_indexer_topk: bool | None = False
    return_entropy: bool | None = False
    return_bytes: bool | None = False
    return_prompt_token_ids: bool | None = False
    return_sampling_mask: Any = None
    sampling_logprobs_mode: Any = None
    return_flat_raw_top_logprobs: bool | None = False
    return_flat_raw_output_top_logprobs: bool | None = False
    return_flat_raw_top_logprobs_b64: bool | None = False
    multi_item_delimiter_indices: Any = None
    token_indices_to_pool: Any = None
    # sampling extensions
    custom_logit_processor: Any = None
    positional_embed_overrides: Any = None
    watermark: Any = None
    require_reasoning: bool | None = False
    max_thinking_tokens: Any = None
    # cache namespaces (a salted prefix would not share the radix cache)
    extra_key: Any = None
    cache_salt: Any = None
    # disaggregated prefill/decode, data parallelism, external KV stores
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    bootstrap_pair_key: Any = None
    decode_tp_size: Any = None
    disagg_prefill_dp_rank: Any = None
    kv_router_hint: Any = None
    kv_hints: Any = None
    data_parallel_rank: Count | None = None
    routed_dp_rank: Count | None = None
    # the OpenAI Responses API
    background: bool | None = False


class OpenAIUnsupported(_Unsupported, kw_only=True):
    """Extras of SGLang's `/v1/chat/completions` and `/v1/completions` for features this server lacks (both
    routes know all of them: the chat-only and completion-only ones are accepted at their default on the other)."""

    return_hidden_states: bool | None = False
    return_routed_experts: bool | None = False
    routed_experts_start_len: Count | None = 0
    return_spec_tokens_details: bool | None = False
    return_token_ids: bool | None = False
    return_prompt_token_ids: bool | None = False
    return_meta_info: bool | None = False
    return_input_ids_in_sglext: bool | None = False
    return_output_ids_in_sglext: bool | None = False
    return_sampling_mask: bool | None = False
    sampling_logprobs_mode: Any = None
    return_flat_raw_output_top_logprobs: bool | None = False
    return_flat_raw_top_logprobs_b64: bool | None = False
    lora_path: Any = None
    custom_logit_processor: Any = None
    watermark: Any = None
    images_config: Any = None
    mm_processor_kwargs: Any = None
    extra_key: Any = None
    cache_salt: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    data_parallel_rank: Count | None = None
    # chat only
    thinking: Any = None
    task: Any = None
    input_ids: Any = None
    max_dynamic_patch: Any = None
    min_dynamic_patch: Any = None
    use_audio_in_video: bool | None = False
    video_config: Any = None
    # OpenAI's chat fields for audio output, web search, moderation and the pre-tools function calling (use tools)
    modalities: Any = None
    audio: Any = None
    web_search_options: Any = None
    moderation: Any = None
    functions: Any = None
    function_call: Any = None
    # completions only
    suffix: Any = None


class ResponsesUnsupported(_Unsupported, kw_only=True):
    """`/v1/responses` (OpenAI's Responses API) fields of features this server lacks."""

    include: list[str] | None = None  # extra outputs (logprobs, encrypted reasoning...)
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None  # OpenAI's stored prompt templates
    background: bool | None = False


UNSUPPORTED = (NativeUnsupported, OpenAIUnsupported, ResponsesUnsupported)


def check_unsupported(req: _Unsupported) -> None:
    """A 400 naming the first field of a missing feature that is set to something other than its default."""
    kind = next(cls for cls in UNSUPPORTED if isinstance(req, cls))
    for f in msgspec.structs.fields(kind):
        value = getattr(req, f.name)
        if value is not None and value != f.default and value != ALSO_ACCEPTED.get(f.name, f.default):
            why = WHY.get(f.name) or f"leave it out or at its default, {f.default!r}"
            raise bad_request(f"{f.name} is not supported by this server ({why})", f.name)
