"""One request's output on its way to a front end (the tokenizer process and the offline Engine alike).

Feeds each scheduler ReqOut through the text tracker (detokenizer + stop strings) and gathers
logprobs; `take()` returns what is new since the previous take as a `wire.TextDelta`, so a long
stream costs each step only its new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixserve import wire
from tokenizer_proc.text import IdsOnly, RequestText


@dataclass(eq=False)
class RequestOutput:
    """Invariant: `_taken` output ids (and their logprobs) and all text but `_new_text` went out in earlier
    deltas; `text.output_ids` is the whole output (it stops growing at a matched stop string)."""

    rid: str
    text: RequestText | IdsOnly
    tokenizer: Any
    prompt_tokens: int
    logprob: bool = False
    logprob_text: bool = False
    cached_tokens: int = 0
    finish: wire.FinishReason | None = None
    spec: wire.SpecCounts | None = None  # speculative decoding's counts, from the scheduler's last message
    _new_text: list[str] = field(default_factory=list)
    _taken: int = 0
    _input_logprobs: list[wire.LogprobEntry] | None = None
    _input_top: list | None = None
    _output_logprobs: list[wire.LogprobEntry] = field(default_factory=list)
    _output_top: list = field(default_factory=list)

    def apply(self, out: wire.ReqOut) -> wire.FinishReason | None:
        """Feed one scheduler output. Returns the finish of a stop string matched here that the
        scheduler does not know of yet (the caller sends it an Abort with it); sets `self.finish`."""
        self.cached_tokens = out.cached_tokens
        self.prompt_tokens = out.prompt_tokens  # a session turn's prompt includes its history
        self.spec = out.spec or self.spec
        if self.logprob:
            self._add_logprobs(out)
        stop_token = out.finish is not None and out.finish.type == "stop" and isinstance(out.finish.matched, int)
        delta, matched = self.text.feed(out.new_ids, stop_token=stop_token)
        self._add_text(delta)
        if matched is None and out.finish is not None:
            delta, matched = self.text.finish()
            self._add_text(delta)
        if matched is None:
            self.finish = out.finish
            return None
        self.finish = wire.FinishReason(type="stop", matched=matched)
        if out.finish is not None:
            return None
        # Tell the scheduler where the output ends: it may have generated a few tokens past the match.
        return wire.FinishReason(type="stop", matched=matched, length=len(self.text.output_ids))

    def _add_text(self, delta: str) -> None:
        """A text delta, after taking back what a stop regex's cut retracted from text not sent yet (a stream
        may have sent it already: see tokenizer_proc/stops.py)."""
        if self.text.retracted:
            untaken = "".join(self._new_text)
            self._new_text[:] = [untaken[:max(len(untaken) - self.text.retracted, 0)]]
        self._new_text.append(delta)

    def due(self, interval: int) -> bool:
        """Whether a stream sends a delta now, given SGLang's stream_interval: every step at 1, else once
        `interval` output ids are not in a delta yet, and at once for the first."""
        return interval == 1 or self._taken == 0 or len(self.text.output_ids) - self._taken >= interval

    def take(self) -> wire.TextDelta:
        """What is new since the previous take (all of it on the first)."""
        n_out = len(self.text.output_ids)
        start, self._taken = self._taken, n_out
        text = "".join(self._new_text)
        self._new_text.clear()
        delta = wire.TextDelta(rid=self.rid, text=text, output_ids=self.text.output_ids[start:n_out],
                               prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
                               completion_tokens=n_out, finish=self.finish,
                               spec=self.spec if self.finish is not None else None)
        if self.logprob:
            # Ids that arrived after a stop string are not output: neither are their logprobs.
            delta.output_logprobs = self._output_logprobs[start:n_out]
            delta.output_top_logprobs = self._output_top[start:n_out]
            delta.input_logprobs, self._input_logprobs = self._input_logprobs, None
            delta.input_top_logprobs, self._input_top = self._input_top, None
        return delta

    def _add_logprobs(self, out: wire.ReqOut) -> None:
        if out.input_logprobs is not None and out.input_ids is not None:
            ids = out.input_ids[len(out.input_ids) - len(out.input_logprobs):]
            self._input_logprobs = [self._entry(lp, t) for lp, t in zip(out.input_logprobs, ids, strict=True)]
            self._input_top = [self._top(top) for top in out.input_top_logprobs or []]
        if out.output_logprobs:
            self._output_logprobs += [self._entry(lp, t)
                                      for lp, t in zip(out.output_logprobs, out.new_ids, strict=False)]
            self._output_top += [self._top(top) for top in out.output_top_logprobs or []]

    def _entry(self, logprob: float | None, token: int) -> wire.LogprobEntry:
        text = self.tokenizer.decode([token]) if self.logprob_text and self.tokenizer is not None else None
        return (logprob, token, text)

    def _top(self, top: list[tuple[int, float]] | None) -> list[wire.LogprobEntry] | None:
        return None if top is None else [self._entry(lp, t) for t, lp in top]
