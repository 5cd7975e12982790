"""A chat answer's reasoning apart from its content (SGLang's --reasoning-parser): the text a reasoning model writes
between `<think>` and `</think>` becomes the message's `reasoning_content`, the rest its `content`.

- `qwen3`: the output may open a reasoning block (Qwen3 thinks unless the chat template's `enable_thinking` is
  false, when the template itself closes an empty block in the prompt);
- `qwen3-thinking`, `deepseek-r1`: the prompt opened the block, so the output starts inside it (an output that
  never closes it is all reasoning, as when max_tokens cuts the thinking short); a `<think>` the model writes
  anyway is dropped.
Whitespace around the reasoning and before the content is not part of either (the templates put newlines there).
"""

from __future__ import annotations

import enum
from typing import NamedTuple, get_args

from radixserve.config import ReasoningParserName
from radixserve.gateway.tool_calls import prefix_overlap

START, END = "<think>", "</think>"
STARTS_INSIDE: dict[str, bool] = {"qwen3": False, "qwen3-thinking": True, "deepseek-r1": True}
assert set(STARTS_INSIDE) == set(get_args(ReasoningParserName)), "a parser named by the flag and not here"


class _Place(enum.Enum):
    BEFORE = "before"  # nothing but blanks yet: a block may still open
    INSIDE = "inside"  # in the reasoning block
    AFTER = "after"  # the content (the block closed, or never opened)


class Split(NamedTuple):
    reasoning: str
    content: str


class ReasoningParser:
    """One choice's text in, (reasoning, content) out, as the text streams; the pieces add up to what the whole
    text gives at once. With `stream_reasoning` false (SGLang's request field) the reasoning comes out in one piece
    when its block closes (or at the end).

    Invariant: `_held` is text not given out yet that may still change what it is: blanks and a proper prefix of
    `<think>` before anything else; inside the block, blanks before its first text, and trailing blanks and a
    proper prefix of `</think>` (blanks before the tag go with it); after a block, blanks before the content.
    """

    def __init__(self, name: ReasoningParserName, stream_reasoning: bool = True) -> None:
        self._place = _Place.INSIDE if STARTS_INSIDE[name] else _Place.BEFORE
        self._stream = stream_reasoning
        self._held = ""
        self._began = False  # the current place gave out text (else its leading blanks are dropped)
        self._unsent: list[str] = []  # reasoning kept back while not streaming it

    def feed(self, text: str, final: bool = False) -> Split:
        """What `text` adds; with `final` (the choice's last text) also all that is held."""
        self._held += text
        reasoning = content = ""
        if self._place is _Place.BEFORE:
            head = self._held.lstrip()
            if head.startswith(START):
                self._place, self._held = _Place.INSIDE, head[len(START):]
            elif final or not START.startswith(head):
                self._place, self._began = _Place.AFTER, True  # no block: the text is the content as it is
        if self._place is _Place.INSIDE:
            reasoning = self._inside(final)
        if self._place is _Place.AFTER:
            content = self._after()
        if not self._stream:
            self._unsent.append(reasoning)
            reasoning = ""
            if self._place is _Place.AFTER or final:
                reasoning = "".join(self._unsent)
                self._unsent.clear()
        return Split(reasoning, content)

    def _inside(self, final: bool) -> str:
        """The reasoning that the held text completes; past `</think>` the place moves on to the content."""
        if not self._began:
            self._held = self._held.lstrip()
            if not final and self._held != START and START.startswith(self._held):
                return ""  # maybe a <think> the model writes itself after the prompt's
            if self._held.startswith(START):
                self._held = self._held[len(START):].lstrip()
        end = self._held.find(END)
        if end >= 0:
            given, self._held = self._held[:end].rstrip(), self._held[end + len(END):]
            self._place, self._began = _Place.AFTER, False
            return given
        if final:
            given, self._held = self._held.rstrip(), ""
        else:
            given = self._held[:len(self._held) - prefix_overlap(self._held, END)].rstrip()
            self._held = self._held[len(given):]
        self._began = self._began or bool(given)
        return given

    def _after(self) -> str:
        given, self._held = (self._held if self._began else self._held.lstrip()), ""
        self._began = self._began or bool(given)
        return given
