"""Incremental detokenization: token ids in, text deltas out, never half a character."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5
"""Prompt tokens decoded in front of the output, as SGLang does, so that a tokenizer whose
decoder strips a leading space (sentencepiece) gives the first output token its space."""
MAX_PENDING = 8
"""Tokens past the prefix before the window is slid back to an earlier clean boundary
(a UTF-8 character spans at most 4 byte tokens)."""


class IncrementalDetokenizer:
    """Decode a growing token sequence into text deltas at a cost independent of its length.

    The prefix-offset technique: `_ids` is a window over the last few tokens and
    `_ids[:_read]` its prefix, which decodes to final text (ending on a character boundary)
    of `_prefix_len` characters. Each call decodes the window once; the text it adds to the
    prefix is emitted up to any trailing U+FFFD run (a multi-byte character still split over
    tokens), and `_sent` counts what of it was emitted. When the added text ends cleanly the
    window slides: the tokens after the prefix become the new prefix.

    Invariant: without `prompt_ids`, the deltas (then `flush()`) concatenate to
    `tokenizer.decode(output_ids, skip_special_tokens=...)`, each a prefix-extension of it.
    With `prompt_ids`, they are the text the output adds to the end of the prompt (the same
    thing for byte-level BPE). Known limit, shared with SGLang's and vLLM's detokenizers:
    with sentencepiece byte fallback, an invalid byte sequence can change how the valid bytes
    next to it decode, so garbage output may differ from a one-shot decode.
    """

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # SGLang's meaning: passed to decode (tokenizers that ignore it, such as HF's fast ones, decode the same)
        self._spaces = spaces_between_special_tokens
        ids = list(prompt_ids[-PROMPT_CONTEXT:]) if prompt_ids else []
        prefix = self._decode(ids)
        if prefix.endswith(REPLACEMENT):  # the prompt ends inside a character: no clean prefix
            ids, prefix = [], ""
        self._ids = ids
        self._read = len(ids)
        self._prefix_len = len(prefix)
        self._sent = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False,
                                      spaces_between_special_tokens=self._spaces)

    def feed(self, new_ids: Sequence[int]) -> str:
        """Append `new_ids`; return the text that is now final (possibly "")."""
        self._ids.extend(new_ids)
        new = self._decode(self._ids)[self._prefix_len :]
        if not new:
            del self._ids[self._read :]  # tokens that decode to nothing (skipped special tokens)
            return ""
        stable = len(new.rstrip(REPLACEMENT))
        delta = new[self._sent : stable]
        self._sent = max(self._sent, stable)
        if stable == len(new):
            self._slide(len(self._ids), len(new))
        elif len(self._ids) - self._read > MAX_PENDING:
            delta += self._slide_back(new)
        return delta

    def flush(self) -> str:
        """Release the held-back tail (an incomplete character decodes to U+FFFD)."""
        new = self._decode(self._ids)[self._prefix_len :]
        delta = new[self._sent :]
        if new:
            self._sent = len(new)
            self._slide(len(self._ids), len(new))
        return delta

    def _slide(self, k: int, consumed: int) -> None:
        """Make `_ids[_read:k]` the prefix; `consumed` characters of the new text lie before k."""
        self._ids, self._read = self._ids[self._read :], k - self._read
        self._prefix_len = len(self._decode(self._ids[: self._read]))
        self._sent -= consumed

    def _slide_back(self, new: str) -> str:
        """Slide an overlong window to its latest clean token boundary; return text this releases.

        With none (a long run of invalid UTF-8), release everything: the cost stays bounded.
        """
        for k in range(len(self._ids) - 1, self._read, -1):
            before = self._decode(self._ids[:k])[self._prefix_len :]
            if before and not before.endswith(REPLACEMENT):
                return self._release(k, before)
        return self._release(len(self._ids), new)

    def _release(self, k: int, before: str) -> str:
        """Slide to boundary k, `before` being the new text up to it; return its unsent part."""
        delta = before[self._sent :]
        self._sent = max(self._sent, len(before))
        self._slide(k, len(before))
        return delta
