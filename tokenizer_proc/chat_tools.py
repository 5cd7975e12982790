"""Tool calling on the prompt side: messages with tool calls and tool results, and tools for chat templates.

A chat template that renders tools (its source mentions `tools`: Llama 3.x, Qwen2.5, Qwen3) gets them as
`apply_chat_template(tools=...)`, and assistant tool calls with their arguments as objects (what templates
expect; OpenAI sends JSON text). A template that does not (SmolLM2's) would drop them silently, so for it the
tools are described in the system message and tool calls written as `<tool_call>` blocks, Hermes-style.

How the model will write its calls follows from the same facts and is decided here once (`tool_call_format`):
the tokenizer reports it to the gateway in `wire.Ready`, and the gateway's parser (radixserve/gateway/tool_calls.py)
reads the output that way.
"""

from __future__ import annotations

import json
from typing import Any

from radixserve.config import ToolCallParserName
from radixserve.wire import HERMES, JSON, ToolCallFormat

TOOL_PROMPT = (
    "You may call one or more functions to assist with the user query. You are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a "
    "json object with the function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _template(tokenizer: Any) -> str:
    """The chat template's source (named templates joined), "" if there is none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = "\n".join(template.values())
    return template if isinstance(template, str) else ""


def renders_tools(tokenizer: Any) -> bool:
    return "tools" in _template(tokenizer)


# SGLang's --tool-call-parser names of the formats (`qwen25` is its older name for `qwen`).
TOOL_CALL_PARSERS: dict[str, ToolCallFormat] = {"qwen": HERMES, "qwen25": HERMES, "llama3": JSON}


def tool_call_format(tokenizer: Any, parser: ToolCallParserName | None = None) -> ToolCallFormat:
    """The format `parser` names (--tool-call-parser), else as the chat template says: HERMES (`<tool_call>` blocks
    among free text) where it writes `<tool_call>` tags (Qwen2.5, Qwen3, Hermes) or renders no tools (they are
    described here, asking for those tags); JSON (one JSON answer) for any other template that renders tools
    (Llama 3.x)."""
    if parser is not None:
        return TOOL_CALL_PARSERS[parser]
    return JSON if renders_tools(tokenizer) and "<tool_call>" not in _template(tokenizer) else HERMES


def tool_calls_of(message: dict) -> list[dict] | None:
    """An assistant message's tool calls with their arguments as objects (a 400 for malformed ones)."""
    calls = message.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise ValueError("tool_calls must be a list")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError("each tool call needs function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise ValueError(f"tool call arguments are not JSON: {e}") from None
        out.append({**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}})
    return out


def describe_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages for a template that does not render tools: the tools (if any) in the system message, tool calls
    as `<tool_call>` blocks in the assistant's text, tool results as `<tool_response>` blocks."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            blocks = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                 ensure_ascii=False) for c in m["tool_calls"]]
            text = "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
            m = {k: v for k, v in m.items() if k != "tool_calls"} | {
                "content": f"{m['content']}\n{text}" if m["content"] else text}
        elif m["role"] == "tool":
            m = {**m, "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if not tools:
        return out
    prompt = TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if out and out[0]["role"] == "system":
        return [{**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}, *out[1:]]
    return [{"role": "system", "content": prompt}, *out]
