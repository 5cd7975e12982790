"""The reasoning parsers (SGLang's --reasoning-parser) on their own: what each makes of whole answers, and that a
stream cut anywhere gives the same reasoning and content. tests/test_structured_output.py runs one in a server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.gateway.reasoning import ReasoningParser, Split

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
