"""SGLang's --log-requests: one log line when a request arrives and one when it ends, in the tokenizer process that
owns it (the offline Engine's too). What a line holds grows with --log-requests-level: 0 the request's id, sizes,
finish and time; 1 also its sampling parameters; 2 also its prompt and output text, each cut to its first
MAX_TEXT_CHARS characters; 3 the whole texts. Costs nothing without the flag (no TokenizerCore holds one)."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from radixserve import wire

log = logging.getLogger("radixserve.requests")
MAX_TEXT_CHARS = 2048  # as SGLang's level 2


class RequestLog:
    """The lines; a request's time is its RequestMetrics timing (the requests logged are the ones it counts)."""

    def __init__(self, level: int, tokenizer: Any | None) -> None:
        self.level = level
        self.tokenizer = tokenizer

    def arrived(self, msg: wire.GenerateTokens, stream: bool) -> None:
        parts = [f"request {msg.rid} arrived: {len(msg.input_ids)} prompt tokens, stream {stream}"]
        if self.level >= 1:
            parts.append(f"sampling {msgspec.json.encode(msg.sampling).decode()}")
        if self.level >= 2:
            parts.append(f"prompt {self._text(msg.input_ids)}")
        log.info("; ".join(parts))

    def ended(self, last: wire.TextDelta, output_ids: list[int], seconds: float) -> None:
        finish = msgspec.json.encode(last.finish).decode()
        parts = [f"request {last.rid} ended in {seconds:.3f} s: finish {finish}, "
                 f"{last.prompt_tokens} prompt tokens ({last.cached_tokens} cached), "
                 f"{last.completion_tokens} output tokens"]
        if self.level >= 2:
            parts.append(f"output {self._text(output_ids)}")
        log.info("; ".join(parts))

    def _text(self, ids: list[int]) -> str:
        """The ids' text as a JSON string (ids where there is no tokenizer), cut below level 3."""
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else str(ids)
        cut = len(text) > MAX_TEXT_CHARS and self.level < 3
        return msgspec.json.encode(text[:MAX_TEXT_CHARS] if cut else text).decode() + (" (cut)" if cut else "")
