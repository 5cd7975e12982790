"""OpenAI-compatible `/v1/completions` and `/v1/chat/completions` requests: their Structs (OpenAI's fields and
SGLang's extras) and their conversion to `wire.GenerateText`. The answers' shapes are in openai_format.py.

Sub-request j of a request is prompt `j // n`, copy `j % n`; it is choice index j.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from radixserve import wire
from radixserve.config import ReasoningParserName
from radixserve.errors import ApiError, bad_request
from radixserve.gateway import tool_calls
from radixserve.gateway.openai_format import StreamOptions
from radixserve.gateway.reasoning import ReasoningParser
from radixserve.native_api import expand
from radixserve.sampling_checks import check_sampling
from radixserve.sampling_params import (
    INT32_MAX,
    MAX_STOPS,
    Choices,
    Count,
    OpenAITemperature,
    Seed,
    TokenId,
    TopK,
    TopLogprobs,
    TopP,
)
from radixserve.sglang_fields import CHAT, OPENAI, check_unsupported, fields_struct

# ---------------------------------------------------------------- requests


class JsonSchemaFormat(Struct, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(Struct, forbid_unknown_fields=True):
    """OpenAI's response_format, and SGLang's structural_tag (xgrammar's: legacy `structures` + `triggers`,
    or a `format`)."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None
    format: dict[str, Any] | None = None


class _Request(fields_struct("OpenAIExtras", OPENAI), forbid_unknown_fields=True,  # type: ignore[misc]
               kw_only=True):
    """What both routes take; the catalogue's OPENAI fields (radixserve/sglang_fields.py) are its base."""

    model: str
    max_tokens: Count | None = None
    temperature: OpenAITemperature | None = None
    top_p: TopP | None = None
    n: Choices = 1
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    frequency_penalty: wire.Penalty = 0.0
    presence_penalty: wire.Penalty = 0.0
    logit_bias: dict[str, wire.LogitBias] | None = None
    response_format: ResponseFormat | None = None
    # SGLang extensions (the openai client's `extra_body`)
    top_k: TopK = -1
    min_p: wire.MinP = 0.0
    min_tokens: Count = 0
    repetition_penalty: wire.RepetitionPenalty = 1.0
    regex: str | None = None
    ebnf: str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[wire.TokenId] = []
    stop_regex: str | list[str] | None = None
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    session_params: wire.SessionParams | None = None  # continue a session turn
    custom_params: dict[str, Any] | None = None
    rid: str | list[str] | None = None
    return_cached_tokens_details: bool = False  # usage always has prompt_tokens_details.cached_tokens


class CompletionRequest(_Request, kw_only=True):
    prompt: str | list[str | TokenId | list[TokenId]]
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    json_schema: str | None = None
    echo: bool = False
    best_of: Choices | None = None  # only n (no server-side ranking)


class ChatCompletionRequest(fields_struct("ChatExtras", CHAT, _Request), kw_only=True):  # type: ignore[misc]
    messages: Annotated[list[dict[str, Any]], Meta(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[tool_calls.Tool] | None = None
    tool_choice: tool_calls.ToolChoice | None = None
    parallel_tool_calls: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None  # passed to the chat template, as SGLang
    separate_reasoning: bool = True  # with --reasoning-parser: the reasoning in reasoning_content (SGLang's fields)
    stream_reasoning: bool = True  # false: a stream's reasoning in one delta, when it ends


def _constraint(req: _Request) -> dict[str, str]:
    """The structured-output field of the request's response_format / regex / ebnf / json_schema."""
    given = {k: v for k, v in (("regex", req.regex), ("ebnf", req.ebnf),
                               ("json_schema", getattr(req, "json_schema", None))) if v is not None}
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return given
    if given:
        raise bad_request(f"response_format cannot be combined with {next(iter(given))}", "response_format")
    if fmt.type == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise bad_request("response_format json_schema needs json_schema.schema", "response_format.json_schema")
        return {"json_schema": json.dumps(fmt.json_schema.schema)}
    tag = {k: v for k, v in (("type", fmt.type), ("structures", fmt.structures), ("triggers", fmt.triggers),
                             ("format", fmt.format)) if v is not None}
    return {"structural_tag": json.dumps(tag)}


def _sampling(req: _Request, max_tokens: int | None, constraint: dict[str, str]) -> wire.SamplingParams:
    """Sampling of one choice; `max_tokens=None` leaves the cap to the tokenizer (the context length)."""
    check_unsupported(req, OPENAI)
    sp = wire.SamplingParams(
        max_new_tokens=INT32_MAX if max_tokens is None else max_tokens, min_new_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, min_p=req.min_p,
        stop=[req.stop] if isinstance(req.stop, str) else req.stop or [], stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, seed=req.seed, skip_special_tokens=req.skip_special_tokens, n=req.n,
        no_stop_trim=req.no_stop_trim,
        stop_regex=[req.stop_regex] if isinstance(req.stop_regex, str) else req.stop_regex or [],
        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
        repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias or {}, custom_params=req.custom_params,
        **constraint)
    check_sampling(sp, prefix="")
    return sp


def _rids(rid: str | list[str] | None, num_prompts: int) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(num_prompts)]
    rids = [rid] if isinstance(rid, str) else rid
    if len(rids) != num_prompts:
        raise bad_request("rid must be one string per prompt", "rid")
    return rids


def completion_requests(req: CompletionRequest) -> list[wire.GenerateText]:
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    elif prompt and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
        prompts = prompt
    else:
        raise bad_request("prompt must be a string, a list of strings, a list of token ids, or a list of those",
                          "prompt")
    if req.best_of not in (None, req.n):
        raise bad_request("best_of is not supported (only best_of == n)", "best_of")
    if req.echo and (req.logprobs is not None or not isinstance(prompts[0], str)):
        raise bad_request("echo is supported for text prompts without logprobs", "echo")
    sp = _sampling(req, 16 if req.max_tokens is None else req.max_tokens, _constraint(req))
    logprob = None if req.logprobs is None else wire.LogprobRequest(top_logprobs_num=req.logprobs)
    out = []
    for p, rid in zip(prompts, _rids(req.rid, len(prompts)), strict=True):
        fields = {"text": p} if isinstance(p, str) else {"input_ids": p}
        out += expand(rid, sp, fields, stream=req.stream, logprob=logprob, return_text_in_logprobs=True,
                      session=req.session_params)
    return out


def completion_echo(req: CompletionRequest, reqs: list[wire.GenerateText]) -> list[str] | None:
    """The prompt text each choice starts with, when the request asks for echo."""
    return [r.text or "" for r in reqs] if req.echo else None


def chat_requests(req: ChatCompletionRequest, tool_call_format: wire.ToolCallFormat
                  ) -> tuple[list[wire.GenerateText], list[tool_calls.ToolParser] | None]:
    """The sub-requests, and one tool-call parser per choice if the model is shown tools."""
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    tools, enforce = tool_calls.resolve(req.tools, req.tool_choice, req.parallel_tool_calls)
    constraint = _constraint(req)
    if enforce is not None:
        if constraint:
            raise bad_request(f"tool_choice {req.tool_choice!r} cannot be combined with {next(iter(constraint))}",
                              "tool_choice")
        constraint = {"json_schema": enforce}
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    sp = _sampling(req, max_tokens, constraint)
    logprob = wire.LogprobRequest(top_logprobs_num=req.top_logprobs or 0) if req.logprobs else None
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    prompt = {"messages": req.messages, "tools": tool_calls.template_tools(tools) or None,
              "chat_template_kwargs": kwargs or None, "continue_final_message": req.continue_final_message}
    reqs = expand(_rids(req.rid, 1)[0], sp, prompt, stream=req.stream, logprob=logprob,
                  return_text_in_logprobs=True, fill_context=max_tokens is None, session=req.session_params)
    if not tools:
        return reqs, None
    names = [t.function.name for t in tools]
    return reqs, [tool_calls.ToolParser(tool_call_format, names, enforce is not None) for _ in reqs]


def reasoning_parsers(req: ChatCompletionRequest, parser: ReasoningParserName | None, num_choices: int
                      ) -> list[ReasoningParser] | None:
    """One reasoning parser per choice, where the server runs one and the request wants its reasoning apart."""
    if parser is None or not req.separate_reasoning:
        return None
    return [ReasoningParser(parser, req.stream_reasoning) for _ in range(num_choices)]


ANY_MODEL = "default"  # SGLang's examples send model="default": it names whatever the server serves


def check_model(requested: str, served: str) -> None:
    """404 for a model this server does not serve (the served name, or "default")."""
    if requested not in (served, ANY_MODEL):
        raise ApiError(404, f"the model {requested!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")
