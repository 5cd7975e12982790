"""One request's output as a front end sees it (the tokenizer process and the offline Engine alike).

Feeds each scheduler ReqOut through the text tracker (detokenizer + stop strings), gathers
logprobs, and renders SGLang's `meta_info`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixserve import wire
from tokenizer_proc.text import IdsOnly, RequestText

LogprobEntry = list  # [logprob, token_id, text or None], as SGLang's meta_info


@dataclass
class RequestOutput:
    text: RequestText | IdsOnly
    tokenizer: Any
    prompt_tokens: int
    logprob: bool = False
    logprob_text: bool = False
    cached_tokens: int = 0
    finish: wire.FinishReason | None = None
    input_logprobs: list[LogprobEntry] | None = None
    input_top: list | None = None
    output_logprobs: list[LogprobEntry] = field(default_factory=list)
    output_top: list = field(default_factory=list)

    def apply(self, out: wire.ReqOut) -> wire.FinishReason | None:
        """Feed one scheduler output. Returns the finish of a stop string matched here that the
        scheduler does not know of yet (the caller sends it an Abort with it); sets `self.finish`."""
        self.cached_tokens = out.cached_tokens
        self.prompt_tokens = out.prompt_tokens  # a session turn's prompt includes its history
        if self.logprob:
            self._add_logprobs(out)
        stop_token = out.finish is not None and out.finish.type == "stop" and isinstance(out.finish.matched, int)
        _, matched = self.text.feed(out.new_ids, stop_token=stop_token)
        if matched is None and out.finish is not None:
            _, matched = self.text.finish()
        if matched is None:
            self.finish = out.finish
            return None
        self.finish = wire.FinishReason(type="stop", matched=matched)
        if out.finish is not None:
            return None
        # Tell the scheduler where the output ends: it may have generated a few tokens past the match.
        return wire.FinishReason(type="stop", matched=matched, length=len(self.text.output_ids))

    def meta(self, since: int = 0) -> dict[str, Any]:
        """SGLang's meta_info; the output logprobs of output tokens `since` onwards (wire.TextChunk)."""
        n_out = len(self.text.output_ids)
        meta: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n_out,
                                "cached_tokens": self.cached_tokens,
                                "finish_reason": self.finish.to_json() if self.finish is not None else None}
        if self.logprob:
            # Ids that arrived after a stop string are not output: neither are their logprobs.
            meta.update(input_token_logprobs=self.input_logprobs, input_top_logprobs=self.input_top,
                        output_token_logprobs=self.output_logprobs[since:n_out],
                        output_top_logprobs=self.output_top[since:n_out])
        return meta

    def _add_logprobs(self, out: wire.ReqOut) -> None:
        if out.input_logprobs is not None and out.input_ids is not None:
            ids = out.input_ids[len(out.input_ids) - len(out.input_logprobs):]
            self.input_logprobs = [self._entry(lp, t) for lp, t in zip(out.input_logprobs, ids, strict=True)]
            self.input_top = [self._top(top) for top in out.input_top_logprobs or []]
        if out.output_logprobs:
            self.output_logprobs += [self._entry(lp, t) for lp, t in zip(out.output_logprobs, out.new_ids, strict=False)]
            self.output_top += [self._top(top) for top in out.output_top_logprobs or []]

    def _entry(self, logprob: float | None, token: int) -> LogprobEntry:
        text = self.tokenizer.decode([token]) if self.logprob_text and self.tokenizer is not None else None
        return [logprob, token, text]

    def _top(self, top: list[tuple[int, float]] | None) -> list[LogprobEntry] | None:
        return None if top is None else [self._entry(lp, t) for t, lp in top]
