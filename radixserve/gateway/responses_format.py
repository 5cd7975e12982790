"""The Responses API's answers: a Response object, or its stream of typed events (`response.created`, the
output items' `added` / `delta` / `done` events, then `response.completed` or `response.incomplete` with the
whole Response); app.Format is the protocol. One response is one choice (sub-request 0).

Output items in order of appearance: with --reasoning-parser, a `reasoning` item with one `reasoning_text` part for
the reasoning; a message with one `output_text` part for each run of text, a `function_call` for each tool call the
parser finds (sent whole: one arguments delta). A stream error is the
chat route's error event, which the openai client raises. Status: "completed" on a stop, "incomplete" with
`incomplete_details.reason` "max_output_tokens" at the length cap, or "abort" (as the chat route's
finish_reason) when aborted.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, NamedTuple

from msgspec import Struct

from radixserve import wire
from radixserve.gateway.reasoning import ReasoningParser
from radixserve.gateway.responses_api import ResponsesRequest
from radixserve.gateway.tokenizer_client import Generation
from radixserve.gateway.tool_calls import ToolCall, ToolParser
from radixserve.native_api import Output


class OutputText(Struct):
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []
    type: str = "output_text"


class MessageItem(Struct, tag_field="type", tag="message"):
    id: str
    status: str
    content: list[OutputText]
    role: str = "assistant"


class ReasoningText(Struct):
    text: str
    type: str = "reasoning_text"


class ReasoningItem(Struct, tag_field="type", tag="reasoning"):
    id: str
    status: str
    content: list[ReasoningText]
    summary: list[Any] = []  # no summaries here


class _TextKind(NamedTuple):
    """An item of text parts, as it streams: a message's output_text or a reasoning item's reasoning_text."""

    prefix: str  # of its ids
    item: type[MessageItem] | type[ReasoningItem]
    part: type[OutputText] | type[ReasoningText]
    events: str  # its delta and done events' prefix
    extra: dict[str, Any]  # fields of those events beside the text


MESSAGE = _TextKind("msg", MessageItem, OutputText, "response.output_text", {"logprobs": []})
REASONING = _TextKind("rs", ReasoningItem, ReasoningText, "response.reasoning_text", {})


class FunctionCallItem(Struct, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str = "completed"


class InputTokensDetails(Struct):
    cached_tokens: int
    cache_write_tokens: int = 0  # no request writes a cache here (the radix cache keeps every prompt by itself)


class OutputTokensDetails(Struct):
    reasoning_tokens: int = 0


class ResponseUsage(Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Struct):
    reason: str


class Response(Struct):
    id: str
    created_at: int
    model: str
    status: str
    output: list[MessageItem | ReasoningItem | FunctionCallItem]
    usage: ResponseUsage | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    parallel_tool_calls: bool
    tool_choice: Any
    tools: list[Any]
    text: Any
    metadata: dict[str, str]
    error: None = None
    previous_response_id: None = None
    store: bool = False  # nothing is stored
    object: str = "response"


def _status(gen: Generation) -> tuple[str, IncompleteDetails | None]:
    """The finished response's status, from its newest delta's finish."""
    finish = gen.last[0].finish if gen.last[0] is not None else None
    if finish is None or finish.type == "stop":
        return "completed", None
    return "incomplete", IncompleteDetails("max_output_tokens" if finish.type == "length" else finish.type)


class ResponsesFormat:
    """Keeps the output items as they appear, for the final Response; `_open` is the index of the item whose text
    is streaming (of kind `_kind`, its text so far in `_texts`), closed before an item of another kind and at the
    end. Items are never changed in place: an event made earlier in the same write must keep what it said."""

    def __init__(self, rid: str, model: str, req: ResponsesRequest, parser: ToolParser | None,
                 reasoning: ReasoningParser | None = None) -> None:
        self.id, self.model, self.req, self.parser, self.reasoning = rid, model, req, parser, reasoning
        self.created = int(time.time())
        self.items: list[MessageItem | ReasoningItem | FunctionCallItem] = []
        self._open: int | None = None
        self._kind = MESSAGE
        self._texts: list[str] = []
        self._seq = 0

    # ------------------------------------------------------------ whole
    def response(self, gen: Generation, outputs: list[Output]) -> Response:
        reasoning, text, calls = self._split(outputs[0].text, final=True)
        if reasoning:
            self.items.append(ReasoningItem(_item_id("rs"), "completed", [ReasoningText(reasoning)]))
        if text or not calls:
            self.items.append(MessageItem(_item_id("msg"), "completed", [OutputText(text)]))
        self.items += [_call_item(c) for c in calls]
        return self._response(gen, *_status(gen))

    # ------------------------------------------------------------ stream
    def head(self, gen: Generation) -> list[Any]:
        snapshot = self._response(gen, "in_progress", None)
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def events(self, gen: Generation, batch: list[tuple[int, wire.TextDelta]]) -> list[Any]:
        events: list[Any] = []
        for _, delta in batch:
            reasoning, text, calls = self._split(delta.text, final=delta.finish is not None)
            if reasoning:
                events += self._text_delta(REASONING, reasoning)
            if text:
                events += self._text_delta(MESSAGE, text)
            for call in calls:
                events += self._close_open()
                item = _call_item(call)
                index = len(self.items)
                self.items.append(item)
                events += [self._event("response.output_item.added", output_index=index,
                                       item=_as_in_progress(item)),
                           self._event("response.function_call_arguments.delta", item_id=item.id,
                                       output_index=index, delta=item.arguments),
                           self._event("response.function_call_arguments.done", item_id=item.id,
                                       output_index=index, arguments=item.arguments, name=item.name),
                           self._event("response.output_item.done", output_index=index, item=item)]
            if delta.finish is not None:
                events += self._close_open()
        return events

    def tail(self, gen: Generation) -> list[Any]:
        status, details = _status(gen)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [self._event(kind, response=self._response(gen, status, details))]

    # ------------------------------------------------------------ parts
    def _split(self, text: str, final: bool) -> tuple[str, str, list[ToolCall]]:
        """The reasoning, the message text and the tool calls that `text` completes."""
        reasoning, text = ("", text) if self.reasoning is None else self.reasoning.feed(text, final)
        return reasoning, *((text, []) if self.parser is None else self.parser.feed(text, final))

    def _text_delta(self, kind: _TextKind, text: str) -> list[Any]:
        events = []
        if self._open is not None and self._kind is not kind:
            events += self._close_open()
        if self._open is None:
            self._open, self._kind, self._texts = len(self.items), kind, []
            item = kind.item(_item_id(kind.prefix), "in_progress", [])
            self.items.append(item)
            events += [self._event("response.output_item.added", output_index=self._open, item=item),
                       self._event("response.content_part.added", item_id=item.id, output_index=self._open,
                                   content_index=0, part=kind.part(""))]
        self._texts.append(text)
        events.append(self._event(f"{kind.events}.delta", item_id=self.items[self._open].id,
                                  output_index=self._open, content_index=0, delta=text, **kind.extra))
        return events

    def _close_open(self) -> list[Any]:
        """The open item's done events; it is replaced (events already made keep the old one)."""
        if self._open is None:
            return []
        index, self._open, kind = self._open, None, self._kind
        part = kind.part("".join(self._texts))
        item = self.items[index] = kind.item(self.items[index].id, "completed", [part])
        return [self._event(f"{kind.events}.done", item_id=item.id, output_index=index, content_index=0,
                            text=part.text, **kind.extra),
                self._event("response.content_part.done", item_id=item.id, output_index=index, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **fields}

    def _response(self, gen: Generation, status: str, details: IncompleteDetails | None) -> Response:
        last = gen.last[0]
        usage = None if last is None or status == "in_progress" else ResponseUsage(
            last.prompt_tokens, InputTokensDetails(last.cached_tokens), last.completion_tokens,
            OutputTokensDetails(), last.prompt_tokens + last.completion_tokens)
        r = self.req
        return Response(self.id, self.created, self.model, status, list(self.items), usage, details, r.instructions,
                        r.max_output_tokens, r.temperature, r.top_p, r.parallel_tool_calls, r.tool_choice or "auto",
                        r.tools or [], r.text or {"format": {"type": "text"}}, r.metadata or {})


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _call_item(call: ToolCall) -> FunctionCallItem:
    return FunctionCallItem(_item_id("fc"), call.id, call.function.name, call.function.arguments)


def _as_in_progress(item: FunctionCallItem) -> FunctionCallItem:
    return FunctionCallItem(item.id, item.call_id, item.name, "", "in_progress")
