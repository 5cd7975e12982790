"""OpenAI-compatible `/v1/completions` and `/v1/chat/completions`: request/response Structs,
conversion to `wire.GenerateText`, and the response and stream-chunk shapes.

Sub-request j of a request is prompt `j // n`, copy `j % n`; it is choice index j.
`finish_reason` is only ever "stop" or "length" (an abort on a client's behalf reads "stop").
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from msgspec import Meta, Struct

from radixserve import wire
from radixserve.errors import ApiError, bad_request
from radixserve.gateway.tokenizer_client import Generation, Output
from radixserve.gateway.validation import INT32_MAX, MAX_N, MAX_STOPS, check_sampling, expand

# ---------------------------------------------------------------- requests


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _Request(Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    max_tokens: Annotated[int, Meta(ge=0, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    user: str | None = None
    # SGLang extensions (the openai client's `extra_body`)
    top_k: Annotated[int, Meta(ge=-1, le=INT32_MAX)] = -1
    min_p: float = 0.0
    min_tokens: Annotated[int, Meta(ge=0, le=INT32_MAX)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[wire.TokenId] = []
    skip_special_tokens: bool = True


class CompletionRequest(_Request, kw_only=True):
    prompt: str | list[str | Annotated[int, Meta(ge=0, le=INT32_MAX)] | list[Annotated[int, Meta(ge=0, le=INT32_MAX)]]]
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None


class ChatCompletionRequest(_Request, kw_only=True):
    messages: Annotated[list[dict[str, Any]], Meta(min_length=1)]
    session_params: wire.SessionParams | None = None  # SGLang extension: continue a session turn
    max_completion_tokens: Annotated[int, Meta(ge=0, le=INT32_MAX)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None


def _sampling(req: _Request, max_tokens: int | None) -> wire.SamplingParams:
    """Sampling of one choice; `max_tokens=None` leaves the cap to the tokenizer (the context length)."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported (only 0)", name)
    sp = wire.SamplingParams(
        max_new_tokens=INT32_MAX if max_tokens is None else max_tokens, min_new_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, min_p=req.min_p,
        stop=[req.stop] if isinstance(req.stop, str) else req.stop or [], stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, seed=req.seed, skip_special_tokens=req.skip_special_tokens, n=req.n)
    check_sampling(sp, prefix="")
    return sp


def completion_requests(req: CompletionRequest) -> list[wire.GenerateText]:
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    elif prompt and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
        prompts = prompt
    else:
        raise bad_request("prompt must be a string, a list of strings, a list of token ids, or a list of those",
                          "prompt")
    sp = _sampling(req, 16 if req.max_tokens is None else req.max_tokens)
    logprob = None if req.logprobs is None else wire.LogprobRequest(top_logprobs_num=req.logprobs)
    out = []
    for p in prompts:
        fields = {"text": p} if isinstance(p, str) else {"input_ids": p}
        out += expand(uuid.uuid4().hex, sp, fields, stream=req.stream, logprob=logprob,
                      return_text_in_logprobs=True)
    return out


def chat_requests(req: ChatCompletionRequest) -> list[wire.GenerateText]:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    sp = _sampling(req, max_tokens)
    logprob = wire.LogprobRequest(top_logprobs_num=req.top_logprobs or 0) if req.logprobs else None
    return expand(uuid.uuid4().hex, sp, {"messages": req.messages}, stream=req.stream, logprob=logprob,
                  return_text_in_logprobs=True, fill_context=max_tokens is None, session=req.session_params)


# ---------------------------------------------------------------- responses


class PromptTokensDetails(Struct):
    cached_tokens: int


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[TokenLogprob]


class ChatMessage(Struct):
    content: str
    role: str = "assistant"


class ChatChoice(Struct):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


def _finish_reason(finish: wire.FinishReason | None) -> str | None:
    return None if finish is None else ("length" if finish.type == "length" else "stop")


Entries = list[wire.LogprobEntry]
Tops = list[list[wire.LogprobEntry] | None]


class _Format:
    """Shared by both routes: usage, and how much text each choice has streamed (for text offsets)."""

    def __init__(self, rid: str, model: str, n: int, num_choices: int, stream_options: StreamOptions | None) -> None:
        self.id = rid  # as SGLang: the (first) request id, which a session's next turn names as session_params.rid
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.include_usage = stream_options is not None and stream_options.include_usage
        self.sent_chars = [0] * num_choices

    def usage(self, lasts: list[wire.TextDelta | None]) -> Usage:
        """Prompt (and cached) tokens once per prompt, not per copy; completion tokens of every choice."""
        metas = [d for d in lasts if d is not None]
        firsts = [d for j, d in enumerate(lasts) if d is not None and j % self.n == 0]
        prompt = sum(d.prompt_tokens for d in firsts)
        completion = sum(d.completion_tokens for d in metas)
        return Usage(prompt, completion, prompt + completion,
                     PromptTokensDetails(sum(d.cached_tokens for d in firsts)))

    def head(self, gen: Generation) -> list[Any]:
        return []

    def tail(self, gen: Generation) -> list[Any]:
        return [self._chunk([], self.usage(gen.last))] if self.include_usage else []

    def events(self, gen: Generation, batch: list[tuple[int, wire.TextDelta]]) -> list[Any]:
        choices = []
        for j, delta in batch:
            entries = delta.output_logprobs or []
            logprobs = (self._logprobs(entries, delta.output_top_logprobs or [], self.sent_chars[j])
                        if gen.reqs[j].logprob is not None else None)
            finish = _finish_reason(delta.finish)
            if delta.text or finish or entries:
                self.sent_chars[j] += len(delta.text)
                choices.append(self._stream_choice(j, delta.text, logprobs, finish))
        return [self._chunk(choices, None)] if choices else []

    def _logprobs_of(self, gen: Generation, j: int, out: Output) -> Any:
        if gen.reqs[j].logprob is None:
            return None
        return self._logprobs(out.output_logprobs, out.output_top_logprobs, 0)

    def _chunk(self, choices: list, usage: Usage | None) -> Any:
        raise NotImplementedError

    def _stream_choice(self, j: int, text: str, logprobs: Any, finish: str | None) -> Any:
        raise NotImplementedError

    def _logprobs(self, entries: Entries, tops: Tops, text_offset: int) -> Any:
        raise NotImplementedError


class CompletionFormat(_Format):

    def response(self, gen: Generation, outputs: list[Output]) -> Completion:
        choices = [CompletionChoice(j, out.text, self._logprobs_of(gen, j, out), _finish_reason(out.last.finish))
                   for j, out in enumerate(outputs)]
        return Completion(self.id, self.created, self.model, choices, self.usage(gen.last))

    def _chunk(self, choices: list, usage: Usage | None) -> Completion:
        return Completion(self.id, self.created, self.model, choices, usage)

    def _stream_choice(self, j: int, text: str, logprobs: Any, finish: str | None) -> CompletionChoice:
        return CompletionChoice(j, text, logprobs, finish)

    def _logprobs(self, entries: Entries, tops: Tops, text_offset: int) -> CompletionLogprobs:
        tokens = [e[2] or "" for e in entries]
        offsets = []
        for tok in tokens:
            offsets.append(text_offset)
            text_offset += len(tok)
        return CompletionLogprobs(tokens, [e[0] for e in entries],
                                  [None if t is None else {e[2] or "": e[0] for e in t} for t in tops]
                                  or [None] * len(tokens), offsets)


class ChatFormat(_Format):

    def response(self, gen: Generation, outputs: list[Output]) -> ChatCompletion:
        choices = [ChatChoice(j, ChatMessage(out.text), self._logprobs_of(gen, j, out),
                              _finish_reason(out.last.finish) or "stop") for j, out in enumerate(outputs)]
        return ChatCompletion(self.id, self.created, self.model, choices, self.usage(gen.last))

    def head(self, gen: Generation) -> list[Any]:
        """The first stream chunk: every choice's role."""
        choices = [ChatChunkChoice(j, Delta(role="assistant", content=""), None, None) for j in range(len(gen.reqs))]
        return [self._chunk(choices, None)]

    def _chunk(self, choices: list, usage: Usage | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.id, self.created, self.model, choices, usage)

    def _stream_choice(self, j: int, text: str, logprobs: Any, finish: str | None) -> ChatChunkChoice:
        return ChatChunkChoice(j, Delta(content=text) if text else Delta(), logprobs, finish)

    def _logprobs(self, entries: Entries, tops: Tops, text_offset: int) -> ChatLogprobs:
        content = []
        for k, (lp, _, tok) in enumerate(entries):
            tok = tok or ""
            top = tops[k] if k < len(tops) and tops[k] is not None else []
            content.append(TokenLogprob(tok, lp, list(tok.encode()),
                                        [TopLogprob(t[2] or "", t[0], list((t[2] or "").encode())) for t in top]))
        return ChatLogprobs(content)


ANY_MODEL = "default"  # SGLang's examples send model="default": it names whatever the server serves


def check_model(requested: str, served: str) -> None:
    """404 for a model this server does not serve (the served name, or "default")."""
    if requested not in (served, ANY_MODEL):
        raise ApiError(404, f"the model {requested!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")
