"""OpenAI's Responses API (`POST /v1/responses`): its request Struct and its conversion to a chat completion
request, so that messages, tools, structured output and sampling take the chat route's one path. The answer's
shape (a Response object, or its stream of typed events) is in responses_format.py.

What this server keeps of it: text input (a string, or message items with text parts), function tools and the
model's function calls with their outputs as input items, `instructions`, `text.format` (text, json_object,
json_schema), `reasoning.effort` (a chat template variable, as the chat route's `reasoning_effort`), and
SGLang's sampling extras, which its router sends with every request (every field, unset ones as null). Responses
are not stored (a client sends the whole conversation as input; `previous_response_id` and `conversation` are a
400), and there are no built-in tools (web or file search, computer use: a 400 naming the tool).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from msgspec import Struct

from radixserve import wire
from radixserve.errors import bad_request
from radixserve.gateway import tool_calls
from radixserve.gateway.openai_api import ChatCompletionRequest, JsonSchemaFormat, ResponseFormat
from radixserve.sampling_params import OpenAITemperature, PositiveCount, TopK, TopP
from radixserve.sglang_fields import RESPONSES, check_unsupported, fields_struct

TEXT_PARTS = ("input_text", "output_text", "text")


class TextFormat(Struct, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(Struct, forbid_unknown_fields=True):
    format: TextFormat | None = None
    verbosity: str | None = None  # accepted, no effect here


class FunctionTool(Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    name: str


class Reasoning(Struct, forbid_unknown_fields=True):
    effort: str | None = None
    summary: str | None = None  # accepted, no effect here: no reasoning summaries
    generate_summary: str | None = None


class ResponsesRequest(fields_struct("ResponsesExtras", RESPONSES),  # type: ignore[misc]
                       forbid_unknown_fields=True, kw_only=True):
    """The catalogue's RESPONSES fields (radixserve/sglang_fields.py) are its base: features this server lacks (a
    400 naming the field unless left out) and fields accepted with no effect."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: PositiveCount | None = None
    temperature: OpenAITemperature | None = None
    top_p: TopP | None = None
    stream: bool | None = False  # null (as SGLang's router sends every unset field): the default (__post_init__)
    tools: list[FunctionTool] | None = None  # a built-in tool (web search...) is a 400 naming its type
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = True
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    # SGLang's extras (its router sends them with every request)
    top_k: TopK | None = None
    min_p: wire.MinP | None = None
    repetition_penalty: wire.RepetitionPenalty | None = None
    request_id: str | None = None  # the response id (and rid), "resp_..." by default

    def __post_init__(self) -> None:
        self.stream = bool(self.stream)
        self.parallel_tool_calls = self.parallel_tool_calls is not False


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request that generates this response (its rid is the response id)."""
    check_unsupported(req, RESPONSES)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + _messages(req.input)
    if not messages:
        raise bad_request("input is empty", "input")
    choice = req.tool_choice
    sglang = {k: v for k, v in (("top_k", req.top_k), ("min_p", req.min_p),
                                ("repetition_penalty", req.repetition_penalty)) if v is not None}
    return ChatCompletionRequest(
        model=req.model, messages=messages, max_completion_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, stream=req.stream, tools=_tools(req.tools),
        tool_choice=tool_calls.NamedToolChoice(tool_calls.FunctionName(choice.name))
        if isinstance(choice, FunctionChoice) else choice,
        parallel_tool_calls=req.parallel_tool_calls, response_format=_response_format(req.text),
        reasoning_effort=req.reasoning.effort if req.reasoning else None,
        rid=req.request_id or f"resp_{uuid.uuid4().hex}", **sglang)


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: message items, and the model's function calls (consecutive ones in one
    assistant message) with their outputs as tool messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"), "content": _text(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {"id": _str(item, "call_id", i), "type": "function",
                    "function": {"name": _str(item, "name", i), "arguments": _str(item, "arguments", i)}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not out[-1]["content"]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _str(item, "call_id", i),
                        "content": _text(item.get("output"), f"input[{i}].output")})
        else:
            raise bad_request(f"input items of type {kind!r} are not supported (message, function_call, "
                              "function_call_output)", f"input[{i}].type")
    return out


def _text(content: Any, param: str) -> str:
    """A string, or text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad_request("content must be a string or a list of text parts (input_text, output_text)", param)


def _str(item: dict[str, Any], key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"a {item.get('type')} item needs {key} (a string)", f"input[{i}].{key}")
    return value


def _tools(tools: list[FunctionTool] | None) -> list[tool_calls.Tool] | None:
    if tools is None:
        return None
    return [tool_calls.Tool(tool_calls.FunctionDef(t.name, t.description, t.parameters, t.strict)) for t in tools]


def _response_format(text: TextConfig | None) -> ResponseFormat | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else ResponseFormat(type=fmt.type)
    if fmt.schema is None:
        raise bad_request("text.format json_schema needs schema", "text.format.schema")
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
        name=fmt.name or "response", description=fmt.description, schema=fmt.schema, strict=fmt.strict))
