"""Tool calling without a server: the parser on each model family's output (cut into every possible stream
chunking), the enforcing schema, and the prompt side (tools and tool calls through a chat template that renders
them, and through SmolLM2's, which does not). The round trip with the openai client on a real server is in
tests/test_structured_output.py."""

from __future__ import annotations

import json
import typing

import jsonschema
import msgspec
import pytest
from transformers import AutoTokenizer

from radixserve import wire
from radixserve.config import ServerArgs, ToolCallParserName
from radixserve.errors import ApiError
from radixserve.gateway.tool_calls import NamedToolChoice, Tool, ToolParser, resolve
from radixserve.model_files import resolve_model
from radixserve.wire import HERMES, JSON
from tokenizer_proc.chat_tools import TOOL_CALL_PARSERS, tool_call_format
from tokenizer_proc.frontend import TokenizerCore
from tokenizer_proc.text import ChatOptions, encode_prompt

TOOLS = msgspec.convert([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}},
], list[Tool])
NAMES = ["get_weather", "add"]


def parse(fmt: str, text: str, chunk: int, enforced: bool = False) -> tuple[str, list[tuple[str, dict]]]:
    """(content, [(name, arguments)]) of `text` streamed `chunk` characters at a time."""
    parser, shown, calls = ToolParser(fmt, NAMES, enforced), [], []
    for i in range(0, len(text), chunk):
        content, new = parser.feed(text[i:i + chunk])
        shown.append(content)
        calls += new
    content, new = parser.finish()
    shown.append(content)
    calls += new
    assert len({c.id for c in calls}) == len(calls)
    return "".join(shown), [(c.function.name, json.loads(c.function.arguments)) for c in calls]


CASES = [  # (format, model output, content, calls)
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Paris"})]),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n'
             '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
     "\n", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]),
    (HERMES, "No tools needed: 1 < 2 and <tool> is not a tag.", "No tools needed: 1 < 2 and <tool> is not a tag.", []),
    (HERMES, '<tool_call>{"name": "unknown_tool", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "unknown_tool", "arguments": {}}</tool_call>', []),
    (HERMES, '<tool_call>[{"name": "add", "arguments": {"a": 3}}]', "", [("add", {"a": 3})]),  # unclosed, a list
    (JSON, '{"name": "get_weather", "parameters": {"city": "Rome"}}', "", [("get_weather", {"city": "Rome"})]),
    (JSON, '<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"b": 2}}',
     "", [("add", {"a": 1}), ("add", {"b": 2})]),
    (JSON, 'The weather is nice. {"name": "add"}', 'The weather is nice. {"name": "add"}', []),
    (JSON, '{"name": "add", "parameters": {"a": 1}', '{"name": "add", "parameters": {"a": 1}', []),  # cut short
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_parser_on_every_chunking(fmt: str, text: str, content: str, calls: list) -> None:
    for chunk in range(1, len(text) + 1):
        assert parse(fmt, text, chunk) == (content, calls), chunk


def test_enforced_calls_are_a_json_array_that_the_schema_describes() -> None:
    tools, schema = resolve(TOOLS, "required", parallel=True)
    assert tools == TOOLS
    output = '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "get_weather", "parameters": {"city": "X"}}]'
    jsonschema.validate(json.loads(output), json.loads(schema))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "nope", "parameters": {}}], json.loads(schema))
    assert parse(HERMES, output, 7, enforced=True) == ("", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "X"})])
    named = json.loads(resolve(TOOLS, msgspec.convert({"function": {"name": "add"}}, NamedToolChoice), True)[1])
    assert named["maxItems"] == 1 and named["items"]["properties"]["name"]["enum"] == ["add"]
    assert json.loads(resolve(TOOLS, "required", parallel=False)[1])["maxItems"] == 1
    assert resolve(TOOLS, "none", parallel=True) == ([], None)
    with pytest.raises(ApiError):
        resolve(TOOLS, msgspec.convert({"function": {"name": "missing"}}, NamedToolChoice), parallel=True)


def test_format_follows_the_chat_template() -> None:
    """The tokenizer decides the format once, from its chat template (the gateway gets it in Ready)."""
    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    assert "tools" not in tok.chat_template and tool_call_format(tok) == HERMES  # the tools go in the system message
    tok.chat_template = "{% if tools %}<tool_call>{{ tools | tojson }}</tool_call>{% endif %}"  # Qwen's style
    assert tool_call_format(tok) == HERMES
    tok.chat_template = "{% if tools %}{{ tools | tojson }} Respond with {\"name\", \"parameters\"}{% endif %}"
    assert tool_call_format(tok) == JSON
    tok.chat_template = {"default": "{{ messages }}", "tool_use": "{% if tools %}{{ tools | tojson }}{% endif %}"}
    assert tool_call_format(tok) == JSON  # named templates count together
    assert tool_call_format(None) == HERMES  # no tokenizer (--skip-tokenizer-init): no chat at all


def test_the_tokenizer_reports_its_format_in_ready() -> None:
    """The scheduler's Ready reaches the gateway through a tokenizer, which adds the format it decided."""
    model_dir = resolve_model(None)
    core = TokenizerCore(ServerArgs(), model_dir)
    runtime = wire.RuntimeInfo(num_kv_slots=64, context_length=2048, vocab_size=49152, device="cpu",
                               dtype="float32", attention_backend="torch", kv_bytes_per_token=1, weight_bytes=1)
    got = core.receive(wire.Ready(runtime=runtime))
    assert isinstance(got.passed, wire.Ready) and got.passed.tool_call_format == HERMES
    assert core.runtime == runtime and got.deltas == [] and got.aborts == []
    # --tool-call-parser names the format instead (SGLang's names; the choices are exactly the formats named)
    assert set(TOOL_CALL_PARSERS) == set(typing.get_args(ToolCallParserName))
    for parser, fmt in TOOL_CALL_PARSERS.items():
        got = TokenizerCore(ServerArgs(tool_call_parser=parser), model_dir).receive(wire.Ready(runtime=runtime))
        assert got.passed.tool_call_format == fmt, parser
    assert TOOL_CALL_PARSERS["llama3"] == JSON != HERMES == TOOL_CALL_PARSERS["qwen25"]


RENDERS_TOOLS = (  # a template in the style of Llama 3.1's: tools as JSON, calls' arguments as objects
    "{% for t in tools or [] %}TOOL {{ t.function.name }} {{ t.function.parameters | tojson }}\n{% endfor %}"
    "{% for m in messages %}<{{ m.role }}>{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")

HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21}'}]


def test_tools_and_tool_calls_reach_the_chat_template() -> None:
    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    # SmolLM2's template renders no tools: they are described in a system message, calls and results as blocks.
    text = tok.decode(encode_prompt(tok, messages=HISTORY, chat=ChatOptions(tools=tools)))
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temperature_c": 21}\n</tool_response>' in text
    # A template that renders tools gets them, and the call's arguments as an object (not JSON text).
    tok.chat_template = RENDERS_TOOLS
    text = tok.decode(encode_prompt(tok, messages=HISTORY, chat=ChatOptions(tools=tools)))
    assert text.startswith('TOOL get_weather {"type": "object"}')
    assert '<assistant>CALL get_weather {"city": "Paris"}</assistant>' in text
    assert text.endswith('<tool>{"temperature_c": 21}</tool><assistant>')
    with pytest.raises(ValueError, match="not JSON"):
        encode_prompt(tok, messages=[{"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{broken"}}]}])
