"""The reasoning parsers (SGLang's --reasoning-parser) on their own: what each makes of whole answers, and that a
stream cut anywhere gives the same reasoning and content. tests/test_structured_output.py runs one in a server."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response as OpenAIResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter
from server_fixture import MODEL

from radixserve import wire
from radixserve.gateway.reasoning import ReasoningParser, Split
from radixserve.gateway.responses_api import ResponsesRequest
from radixserve.gateway.responses_format import ResponsesFormat
from radixserve.gateway.tokenizer_client import Generation
from radixserve.native_api import Output

CASES = [  # (parser, text, (reasoning, content))
    ("qwen3", "<think>\nLet me see.\n</think>\n\nThe answer.", ("Let me see.", "The answer.")),
    ("qwen3", "\n<think>a</think>b", ("a", "b")),
    ("qwen3", "The answer.", ("", "The answer.")),
    ("qwen3", "  The <think> is late", ("", "  The <think> is late")),  # no block at the start: as it is
    ("qwen3", " <thin", ("", " <thin")),
    ("qwen3", "<think>\n\n</think>\n\nHi", ("", "Hi")),
    ("qwen3", "<think>cut short by max_tokens", ("cut short by max_tokens", "")),
    ("deepseek-r1", "First, 2 + 2.\n</think>\n\n4", ("First, 2 + 2.", "4")),
    ("deepseek-r1", "<think>\nOpened again.</think>Done", ("Opened again.", "Done")),  # R1-0528 opens it itself
    ("deepseek-r1", "no end tag", ("no end tag", "")),
    ("qwen3-thinking", "a </ think> b</think>c", ("a </ think> b", "c")),
    ("qwen3-thinking", "x</think>", ("x", "")),
    ("qwen3-thinking", "x</think>  y </think>", ("x", "y </think>")),  # one block: later tags are content
]


def streamed(name: str, pieces: list[str], stream_reasoning: bool = True) -> tuple[list[Split], Split]:
    parser = ReasoningParser(name, stream_reasoning)
    splits = [parser.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return splits, Split("".join(s.reasoning for s in splits), "".join(s.content for s in splits))


@pytest.mark.parametrize(("name", "text", "want"), CASES)
def test_whole_answers(name: str, text: str, want: tuple[str, str]) -> None:
    assert ReasoningParser(name).feed(text, final=True) == want
    assert streamed(name, list(text))[1] == want  # character by character


@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 60), max_size=8), stream_reasoning=st.booleans())
@settings(max_examples=300, deadline=None)
def test_any_cut_of_a_stream_gives_the_same(case, cuts: list[int], stream_reasoning: bool) -> None:
    name, text, want = case
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    splits, total = streamed(name, pieces, stream_reasoning)
    assert total == want
    if not stream_reasoning:  # the reasoning in one delta
        assert sum(bool(s.reasoning) for s in splits) == bool(want[0])


def test_reasoning_streams_as_it_comes_and_content_waits_for_the_block_to_close() -> None:
    splits, _ = streamed("qwen3", ["<think>\nStep one", ", step two", "\n</th", "ink>\n\nDone", "."])
    assert splits == [("Step one", ""), (", step two", ""), ("", ""), ("", "Done"), ("", ".")]
    splits, _ = streamed("qwen3", ["<think>\nStep one", ", step two", "\n</th", "ink>\n\nDone", "."], False)
    assert splits == [("", ""), ("", ""), ("", ""), ("Step one, step two", "Done"), ("", ".")]


def test_the_responses_api_streams_a_reasoning_item_before_the_message() -> None:
    """/v1/responses with a reasoning parser: a `reasoning` item (one reasoning_text part) and then the message,
    streamed as events the openai client's types accept and whole; the stream's last Response equals the whole one."""
    req = msgspec.convert({"model": MODEL, "input": "Is the sky blue?", "stream": True}, ResponsesRequest)
    pieces = ["<think>\nStep", " one\n</thi", "nk>\n\nThe ", "answer."]
    gen = Generation([wire.GenerateText(rid="resp_1")], stream=True)
    streaming = ResponsesFormat("resp_1", MODEL, req, None, ReasoningParser("qwen3"))
    events = streaming.head(gen)
    output = Output()
    for i, piece in enumerate(pieces):
        delta = wire.TextDelta(rid="resp_1", text=piece, output_ids=[7], prompt_tokens=5, cached_tokens=0,
                               completion_tokens=i + 1, finish=wire.FinishReason(type="stop") if i == 3 else None)
        gen.update(0, delta)
        output.add(delta)
        events += streaming.events(gen, [(0, delta)])
    events += streaming.tail(gen)
    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(msgspec.to_builtins(e)) for e in events]
    assert [e.delta for e in parsed if e.type == "response.reasoning_text.delta"] == ["Step", " one"]
    assert "".join(e.delta for e in parsed if e.type == "response.output_text.delta") == "The answer."
    streamed = parsed[-1].response
    assert [item.type for item in streamed.output] == ["reasoning", "message"]
    assert streamed.output[0].content[0].text == "Step one" and streamed.output_text == "The answer."
    whole = ResponsesFormat("resp_1", MODEL, req, None, ReasoningParser("qwen3")).response(gen, [output])
    assert OpenAIResponse.model_validate(msgspec.to_builtins(whole)).output_text == "The answer."
    assert [type(item).__name__ for item in whole.output] == ["ReasoningItem", "MessageItem"]
    assert whole.output[0].content[0].text == "Step one"
