"""The Responses API's answers: a Response object, or its stream of typed events (`response.created`, the
output items' `added` / `delta` / `done` events, then `response.completed` or `response.incomplete` with the
whole Response); app.Format is the protocol. One response is one choice (sub-request 0).

Output items in order of appearance: a message with one `output_text` part for each run of text, a
`function_call` for each tool call the parser finds (sent whole: one arguments delta). A stream error is the
chat route's error event, which the openai client raises. Status: "completed" on a stop, "incomplete" with
`incomplete_details.reason` "max_output_tokens" at the length cap, or "abort" (as the chat route's
finish_reason) when aborted.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from msgspec import Struct

from radixserve import wire
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


class FunctionCallItem(Struct, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str = "completed"


class InputTokensDetails(Struct):
    cached_tokens: int


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
    output: list[MessageItem | FunctionCallItem]
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
    """Keeps the output items as they appear, for the final Response; `_open` is the index of the message item
    whose text is streaming (its text so far in `_texts`), closed before a function call and at the end.
    Items are never changed in place: an event made earlier in the same write must keep what it said."""

    def __init__(self, rid: str, model: str, req: ResponsesRequest, parser: ToolParser | None) -> None:
        self.id, self.model, self.req, self.parser = rid, model, req, parser
        self.created = int(time.time())
        self.items: list[MessageItem | FunctionCallItem] = []
        self._open: int | None = None
        self._texts: list[str] = []
        self._seq = 0

    # ------------------------------------------------------------ whole
    def response(self, gen: Generation, outputs: list[Output]) -> Response:
        text, calls = self._split(outputs[0].text, final=True)
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
            text, calls = self._split(delta.text, final=delta.finish is not None)
            if text:
                events += self._text_delta(text)
            for call in calls:
                events += self._close_message()
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
                events += self._close_message()
        return events

    def tail(self, gen: Generation) -> list[Any]:
        status, details = _status(gen)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [self._event(kind, response=self._response(gen, status, details))]

    # ------------------------------------------------------------ parts
    def _split(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        return (text, []) if self.parser is None else self.parser.feed(text, final)

    def _text_delta(self, text: str) -> list[Any]:
        events = []
        if self._open is None:
            self._open, self._texts = len(self.items), []
            item = MessageItem(_item_id("msg"), "in_progress", [])
            self.items.append(item)
            events += [self._event("response.output_item.added", output_index=self._open, item=item),
                       self._event("response.content_part.added", item_id=item.id, output_index=self._open,
                                   content_index=0, part=OutputText(""))]
        self._texts.append(text)
        events.append(self._event("response.output_text.delta", item_id=self.items[self._open].id,
                                  output_index=self._open, content_index=0, delta=text, logprobs=[]))
        return events

    def _close_message(self) -> list[Any]:
        """The open message's done events; its item is replaced (events already made keep the old one)."""
        if self._open is None:
            return []
        index, self._open = self._open, None
        part = OutputText("".join(self._texts))
        item = self.items[index] = MessageItem(self.items[index].id, "completed", [part])
        return [self._event("response.output_text.done", item_id=item.id, output_index=index, content_index=0,
                            text=part.text, logprobs=[]),
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
