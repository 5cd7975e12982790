"""The OpenAI routes' answers: response and stream-chunk Structs, and the formats that build them from a
generation's deltas (`ChatFormat`, `CompletionFormat`; app.Format is their protocol).

Sub-request j of a request is prompt `j // n`, copy `j % n`; it is choice index j. `finish_reason` is "stop",
"length", "tool_calls" (a chat choice whose text held tool calls and that stopped) or, as in SGLang, "abort"
(aborted on a client's behalf, or by a shutdown past --shutdown-timeout). `matched_stop`, as in SGLang: the stop
token id or stop string that ended a choice, else null.
"""

from __future__ import annotations

import time
from typing import Any

from msgspec import Struct

from radixserve import wire
from radixserve.gateway.reasoning import ReasoningParser, Split
from radixserve.gateway.tokenizer_client import Generation
from radixserve.gateway.tool_calls import ToolCall, ToolCallDelta, ToolParser
from radixserve.native_api import Output


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # SGLang's: every chunk carries the usage so far


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


class ChatMessage(Struct, omit_defaults=True):
    role: str
    content: str | None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None  # with a reasoning parser (SGLang's field)


class ChatChoice(Struct):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: str
    matched_stop: int | str | None = None


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
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    matched_stop: int | str | None = None


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
    matched_stop: int | str | None = None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


def _finish_reason(finish: wire.FinishReason | None, tool_calls: bool = False) -> str | None:
    if finish is None:
        return None
    return "tool_calls" if tool_calls and finish.type == "stop" else finish.type


def _matched_stop(finish: wire.FinishReason | None) -> int | str | None:
    return finish.matched if finish is not None and finish.type == "stop" else None


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
        self.continuous_usage = stream_options is not None and stream_options.continuous_usage_stats
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
            choice = self._stream_choice(j, delta.text, logprobs, delta.finish, bool(entries))
            if choice is not None:
                choices.append(choice)
        if not choices:
            return []
        return [self._chunk(choices, self.usage(gen.last) if self.continuous_usage else None)]

    def _logprobs_of(self, gen: Generation, j: int, out: Output) -> Any:
        if gen.reqs[j].logprob is None:
            return None
        return self._logprobs(out.output_logprobs, out.output_top_logprobs, 0)

    def _chunk(self, choices: list, usage: Usage | None) -> Any:
        raise NotImplementedError

    def _stream_choice(self, j: int, text: str, logprobs: Any, finish: wire.FinishReason | None,
                       has_logprobs: bool) -> Any:
        """Choice j's part of a stream chunk for its new text, or None if there is nothing to send."""
        raise NotImplementedError

    def _logprobs(self, entries: Entries, tops: Tops, text_offset: int) -> Any:
        raise NotImplementedError


class CompletionFormat(_Format):
    """`echo`: each choice's prompt text, which its text starts with (OpenAI's echo, text prompts only)."""

    def __init__(self, rid: str, model: str, n: int, num_choices: int, stream_options: StreamOptions | None,
                 echo: list[str] | None = None) -> None:
        super().__init__(rid, model, n, num_choices, stream_options)
        self.echo = echo

    def response(self, gen: Generation, outputs: list[Output]) -> Completion:
        choices = [CompletionChoice(j, self._echoed(j) + out.text, self._logprobs_of(gen, j, out),
                                    _finish_reason(out.last.finish), _matched_stop(out.last.finish))
                   for j, out in enumerate(outputs)]
        return Completion(self.id, self.created, self.model, choices, self.usage(gen.last))

    def _echoed(self, j: int) -> str:
        return self.echo[j] if self.echo is not None else ""

    def _chunk(self, choices: list, usage: Usage | None) -> Completion:
        return Completion(self.id, self.created, self.model, choices, usage)

    def _stream_choice(self, j: int, text: str, logprobs: Any, finish: wire.FinishReason | None,
                       has_logprobs: bool) -> CompletionChoice | None:
        if not (text or finish or has_logprobs):
            return None
        if self.sent_chars[j] == 0:
            text = self._echoed(j) + text
        self.sent_chars[j] += len(text)
        return CompletionChoice(j, text, logprobs, _finish_reason(finish), _matched_stop(finish))

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
    """`reasoning_parsers`: one per choice with a reasoning parser; they take the reasoning out of the text first.
    `tool_parsers`: one per choice when the request has tools; they take tool calls out of the rest."""

    def __init__(self, rid: str, model: str, n: int, num_choices: int, stream_options: StreamOptions | None,
                 tool_parsers: list[ToolParser] | None = None,
                 reasoning_parsers: list[ReasoningParser] | None = None) -> None:
        super().__init__(rid, model, n, num_choices, stream_options)
        self.parsers = tool_parsers
        self.reasoning = reasoning_parsers

    def _split(self, j: int, text: str, final: bool) -> Split:
        return Split("", text) if self.reasoning is None else self.reasoning[j].feed(text, final)

    def response(self, gen: Generation, outputs: list[Output]) -> ChatCompletion:
        choices = []
        for j, out in enumerate(outputs):
            (reasoning, content), calls = self._split(j, out.text, final=True), []
            if self.parsers is not None:
                content, calls = self.parsers[j].feed(content, final=True)
                content = content.strip() if calls else content
            message = ChatMessage("assistant", content or (None if calls else ""), calls or None, reasoning or None)
            choices.append(ChatChoice(j, message, self._logprobs_of(gen, j, out),
                                      _finish_reason(out.last.finish, bool(calls)) or "stop",
                                      _matched_stop(out.last.finish)))
        return ChatCompletion(self.id, self.created, self.model, choices, self.usage(gen.last))

    def head(self, gen: Generation) -> list[Any]:
        """The first stream chunk: every choice's role."""
        choices = [ChatChunkChoice(j, Delta(role="assistant", content=""), None, None) for j in range(len(gen.reqs))]
        return [self._chunk(choices, None)]

    def _chunk(self, choices: list, usage: Usage | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.id, self.created, self.model, choices, usage)

    def _stream_choice(self, j: int, text: str, logprobs: Any, finish: wire.FinishReason | None,
                       has_logprobs: bool) -> ChatChunkChoice | None:
        calls: list[ToolCall] = []
        reasoning, text = self._split(j, text, final=finish is not None)
        if self.parsers is not None:
            parser = self.parsers[j]
            before = len(parser.calls)
            text, calls = parser.feed(text, final=finish is not None)
            deltas = [ToolCallDelta(before + k, c.id, c.function) for k, c in enumerate(calls)]
            reason = _finish_reason(finish, bool(parser.calls))
        else:
            deltas, reason = [], _finish_reason(finish)
        if not (text or reasoning or deltas or reason or has_logprobs):
            return None
        delta = Delta(content=text or None, tool_calls=deltas or None, reasoning_content=reasoning or None)
        return ChatChunkChoice(j, delta, logprobs, reason, _matched_stop(finish))

    def _logprobs(self, entries: Entries, tops: Tops, text_offset: int) -> ChatLogprobs:
        content = []
        for k, (lp, _, tok) in enumerate(entries):
            tok = tok or ""
            top = tops[k] if k < len(tops) and tops[k] is not None else []
            content.append(TokenLogprob(tok, lp, list(tok.encode()),
                                        [TopLogprob(t[2] or "", t[0], list((t[2] or "").encode())) for t in top]))
        return ChatLogprobs(content)


