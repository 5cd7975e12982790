"""OpenAI tool calling: the request's tools and tool_choice, the constraint that enforces a call, and the parser
that turns a choice's text into `tool_calls`.

Parsing happens here, in the gateway's chat formatter, because tool calls are a shape of the OpenAI answer (the
native /generate returns the text as it is), the gateway holds the request's tools, and it builds the stream's
deltas; the tokenizer process only renders the tools into the prompt.

Output formats (wire.ToolCallFormat), decided by the tokenizer from the chat template and reported in its
`Ready` (tokenizer_proc/chat_tools.py, `tool_call_format`): HERMES, `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` blocks among free text; JSON, an answer that is one JSON object `{"name": ...,
"parameters": {...}}` (or several separated by ";", or an array), optionally after `<|python_tag|>`.
`tool_choice` "required" or a named function is enforced as SGLang does: the output must be a JSON array of
`{"name", "parameters"}` (a JSON schema for structured output), parsed as JSON.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from msgspec import Struct

from radixserve.errors import bad_request
from radixserve.wire import HERMES, JSON, ToolCallFormat

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"

# ---------------------------------------------------------------- request side


class FunctionDef(Struct, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct, forbid_unknown_fields=True):
    function: FunctionDef
    type: Literal["function"] = "function"


class FunctionName(Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(Struct, forbid_unknown_fields=True):
    function: FunctionName
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def resolve(tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool) -> tuple[list[Tool], str | None]:
    """(the tools the model sees, the JSON schema that enforces the choice or None); a 400 for a bad choice.
    OpenAI's default choice is "auto" with tools, "none" without; "none" shows the model no tools."""
    tools = tools or []
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool function names must be unique", "tools")
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return [], None
    if not tools:
        raise bad_request("tool_choice needs tools", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        tool = next((t for t in tools if t.function.name == choice.function.name), None)
        if tool is None:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
        return tools, json.dumps({"type": "array", "minItems": 1, "maxItems": 1, "items": _call_schema(tool)})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": [_call_schema(t) for t in tools]}}
    if not parallel:
        schema["maxItems"] = 1
    defs = {}
    for t in tools:
        for name, definition in (t.function.parameters or {}).get("$defs", {}).items():
            if defs.setdefault(name, definition) != definition:
                raise bad_request(f"tools define $defs {name!r} differently", "tools")
    if defs:
        schema["$defs"] = defs
    return tools, json.dumps(schema)


def _call_schema(tool: Tool) -> dict[str, Any]:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                             "parameters": params},
            "required": ["name", "parameters"]}


def template_tools(tools: list[Tool]) -> list[dict[str, Any]]:
    """Tools as chat templates take them (OpenAI's JSON shape, without nulls)."""
    out = []
    for t in tools:
        fn = {k: v for k, v in (("name", t.function.name), ("description", t.function.description),
                                ("parameters", t.function.parameters)) if v is not None}
        out.append({"type": "function", "function": fn})
    return out


# ---------------------------------------------------------------- output side


class FunctionCall(Struct):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class ToolCallDelta(Struct):
    """A streamed tool call: this server sends each call whole, in one delta (the `openai` client merges
    deltas by index, so a whole call is a valid stream)."""

    index: int
    id: str
    function: FunctionCall
    type: str = "function"


class ToolParser:
    """One choice's text in, (content to show, tool calls) out, as the text streams.

    Invariant: `_held` is text not yet shown that may still turn out to be (part of) a tool call: in HERMES, a
    tail that could start `<tool_call>` or a block not closed yet; in JSON (and enforced) mode, everything from
    the first non-blank character on, when that is `{`, `[` or `<|python_tag|>` (decided at finish).
    """

    def __init__(self, fmt: ToolCallFormat, tool_names: list[str], enforced: bool) -> None:
        self.fmt = JSON if enforced else fmt
        self.names = set(tool_names)
        self.enforced = enforced
        self._held = ""
        self._json_mode: bool | None = None  # JSON format: whether the answer is a tool call (None: undecided)
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """The content and calls `text` completes; with `final` (the choice's last text) also all that is held."""
        self._held += text
        shown, calls = self._hermes(final=False) if self.fmt == HERMES else self._json(final=False)
        if final:
            rest, more = self.finish()
            shown, calls = shown + rest, calls + more
        return shown, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._hermes(final=True) if self.fmt == HERMES else self._json(final=True)

    def _json(self, final: bool) -> tuple[str, list[ToolCall]]:
        if self._json_mode is None:
            head = self._held.lstrip()
            if not final and (not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG)):
                return "", []  # undecided: nothing yet, or maybe the start of <|python_tag|>
            self._json_mode = self.enforced or head.startswith(("{", "[", PYTHON_TAG))
        if not self._json_mode:
            shown, self._held = self._held, ""
            return shown, []
        if not final:
            return "", []
        text, self._held = self._held, ""
        calls = self._calls(_json_values(text.strip().removeprefix(PYTHON_TAG)))
        return ("", calls) if calls else (text, [])

    def _hermes(self, final: bool) -> tuple[str, list[ToolCall]]:
        shown, calls = [], []
        while True:
            start = self._held.find(OPEN)
            if start < 0:
                keep = 0 if final else prefix_overlap(self._held, OPEN)
                shown.append(self._held[:len(self._held) - keep])
                self._held = self._held[len(self._held) - keep:]
                break
            end = self._held.find(CLOSE, start)
            if end < 0 and not final:
                shown.append(self._held[:start])
                self._held = self._held[start:]
                break
            block = self._held[start + len(OPEN):end if end >= 0 else len(self._held)]
            found = self._calls(_json_values(block.strip()))
            shown.append(self._held[:start] if found else self._held[:end + len(CLOSE) if end >= 0 else None])
            calls += found
            self._held = self._held[end + len(CLOSE):] if end >= 0 else ""
        return "".join(shown), calls

    def _calls(self, values: list[Any] | None) -> list[ToolCall]:
        """Tool calls from parsed JSON values: objects with a known `name` and `arguments` / `parameters`;
        none unless every value is one."""
        if not values:
            return []
        objs = [v for value in values for v in (value if isinstance(value, list) else [value])]
        calls = []
        for obj in objs:
            args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
            if not isinstance(obj, dict) or obj.get("name") not in self.names or not isinstance(args, dict):
                return []
            calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}",
                                  FunctionCall(obj["name"], json.dumps(args, ensure_ascii=False))))
        self.calls += calls
        return calls


def _json_values(text: str) -> list[Any] | None:
    """One or more JSON values separated by ";" or blanks (Llama 3.x), or None if the text is not that."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
    return values or None


def prefix_overlap(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
