"""Structured output with xgrammar (SGLang's default grammar backend), on worker rank 0, which samples.

Matchers live here because the token mask must be applied to the logits, which only rank 0 holds; the
tokenizer (for xgrammar's vocabulary) is loaded here too. Compilation is off the step path: the scheduler asks
for it as a request arrives (StepBatch.grammars), a thread compiles it, the next StepResult reports it done
(or its error, which the scheduler answers with a 400), and only then is the request admitted. Compiled
grammars are cached by xgrammar's compiler, bounded in bytes (GRAMMAR_CACHE_BYTES); one evicted before its
request is admitted is compiled again at admission (a stall, not an error).

Invariant: a request never gets a token its grammar rejects. Each kept row's logits are masked to the tokens
its matcher accepts before sampling, and its matcher accepts the sampled token before the next mask is made.
With overlap scheduling the next step is launched before this one's tokens reach the host, so the tokens of
grammar rows travel to the host on their own (`_pending`) and are accepted when the next mask is due. A matcher
follows only kept samples (StepBatch.sample_offsets >= 0), and a re-admitted (retracted) request's matcher is
rebuilt from the output it had (NewReq.output_ids). A matcher that accepted a stop token is finished: its request
ends on that token, and any row sampled for it after (already in flight) is dropped by the scheduler.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
from typing import Any

import numpy as np
import torch

from radixserve.wire import CompileGrammar, Grammar, GrammarDone, from_i32

log = logging.getLogger("radixserve.worker")

GRAMMAR_CACHE_BYTES = 256 << 20
ANY_JSON = "$$ANY$$"
WAIT_S = 0.05  # how long a step with no requests waits for a compile to finish


class GrammarBackend:
    """xgrammar's compiler (made lazily, in the compile thread: importing xgrammar takes seconds) and the
    compiles in flight."""

    def __init__(self, tokenizer_path: str, vocab_size: int, any_whitespace: bool = True,
                 max_whitespace_cnt: int | None = None, trust_remote_code: bool = False) -> None:
        self.tokenizer_path = tokenizer_path
        self.trust_remote_code = trust_remote_code
        self.vocab_size = vocab_size
        self.json_options = {"any_whitespace": any_whitespace, "max_whitespace_cnt": max_whitespace_cnt}
        self._compiler: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._inflight: dict[concurrent.futures.Future, int] = {}

    def start(self, jobs: list[CompileGrammar]) -> None:
        for job in jobs:
            self._inflight[self._pool.submit(self.compile, job.grammar)] = job.gid

    def done(self, wait: bool = False) -> list[GrammarDone]:
        """Compiles finished since the last call; with `wait`, wait up to WAIT_S for one if none has."""
        if wait and self._inflight:
            concurrent.futures.wait(self._inflight, WAIT_S, return_when=concurrent.futures.FIRST_COMPLETED)
        out = []
        for future in [f for f in self._inflight if f.done()]:
            gid = self._inflight.pop(future)
            error = future.exception()
            out.append(GrammarDone(gid, None if error is None else f"invalid grammar: {_message(error)}"))
        return out

    def compile(self, grammar: Grammar) -> Any:
        """xgrammar's CompiledGrammar (from its cache if compiled before); raises on an invalid grammar."""
        comp = self._compiler or self._make_compiler()
        if grammar.kind == "json_schema":
            if grammar.source == ANY_JSON:
                return comp.compile_builtin_json_grammar()
            return comp.compile_json_schema(grammar.source, **self.json_options)
        if grammar.kind == "regex":
            return comp.compile_regex(grammar.source)
        if grammar.kind == "ebnf":
            return comp.compile_grammar(grammar.source)
        return comp.compile_structural_tag(_structural_tag(grammar.source))

    def _make_compiler(self) -> Any:
        import xgrammar as xgr
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, trust_remote_code=self.trust_remote_code)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
        return self._compiler


def _message(error: BaseException) -> str:
    """xgrammar's message without its log prefix ("[12:00:00] /project/cpp/file.cc:83: ")."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error)).strip()


def _structural_tag(source: str) -> Any:
    """SGLang's structural_tag: the legacy {"structures": [{begin, schema, end}], "triggers"} or xgrammar's own."""
    import xgrammar as xgr

    tag = json.loads(source)
    if isinstance(tag, dict) and "structures" in tag and "triggers" in tag:
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema") or {}), end=s["end"])
                 for s in tag["structures"]]
        return xgr.StructuralTag.from_legacy_structural_tag(items, tag["triggers"])
    return source


class SlotGrammars:
    """Each req slot's grammar matcher, the token masks of a step's rows, and the tokens they accept."""

    def __init__(self, backend: GrammarBackend, device: torch.device) -> None:
        self.backend = backend
        self.device = device
        self.matchers: dict[int, Any] = {}  # req slot -> xgrammar GrammarMatcher
        # Sampled tokens on their way to the host, in step order: (matchers of the kept grammar rows, their
        # tokens on the host once `event` fired).
        self._pending: list[tuple[list[Any], torch.Tensor, torch.cuda.Event | None]] = []
        self._bitmask: torch.Tensor | None = None

    def set(self, slot: int, grammar: Grammar | None, stop_ids: np.ndarray, output_ids: bytes = b"") -> None:
        """The request entering `slot` (None: unconstrained); a re-admitted one replays what it output."""
        if grammar is None:
            self.matchers.pop(slot, None)
            return
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self.backend.compile(grammar),
                                     override_stop_tokens=[int(t) for t in stop_ids] or None)
        for token in from_i32(output_ids).tolist():
            if not matcher.accept_token(token):
                log.error("slot %d: a re-admitted request's output token %d breaks its grammar", slot, token)
        self.matchers[slot] = matcher

    def constrained(self, slots: np.ndarray) -> np.ndarray:
        """Which rows have a grammar (min_new_tokens does not hold back their end: the grammar decides it)."""
        return np.fromiter((int(s) in self.matchers for s in slots), dtype=bool, count=len(slots))

    def mask(self, logits: torch.Tensor, slots: np.ndarray, kept: np.ndarray) -> None:
        """Mask each kept grammar row of `logits` to the tokens its matcher accepts (in place)."""
        if not self.matchers:
            return  # no grammar in flight: nothing per row
        rows = [i for i in np.flatnonzero(kept) if int(slots[i]) in self.matchers]
        if not rows:
            return
        self._accept_pending()
        bitmask = self._host_bitmask(len(slots), logits.shape[-1])
        masked = []
        for i in rows:
            matcher = self.matchers[int(slots[i])]
            if not matcher.is_terminated():  # a finished grammar's row is dropped by the scheduler
                matcher.fill_next_token_bitmask(bitmask, int(i))
                masked.append(int(i))
        if masked:
            self._apply(logits, masked)

    def warm_up(self, logits: torch.Tensor) -> None:
        """Build the bitmask kernel (JIT-compiled on CUDA) on `logits` [B, V], with every token allowed."""
        self._host_bitmask(len(logits), logits.shape[-1])[:len(logits)].fill_(-1)
        self._apply(logits, list(range(len(logits))))

    def _host_bitmask(self, rows: int, vocab: int) -> torch.Tensor:
        """The host bitmask buffer, of at least `rows` rows."""
        import xgrammar as xgr

        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = xgr.allocate_token_bitmask(max(rows, 64), vocab)
            if self.device.type == "cuda":
                self._bitmask = self._bitmask.pin_memory()
        return self._bitmask

    def _apply(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Mask `rows` of `logits` with their rows of the host bitmask."""
        import xgrammar as xgr

        bitmask = self._bitmask[:len(logits)].to(self.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)

    def record(self, slots: np.ndarray, next_ids: torch.Tensor, kept: np.ndarray) -> None:
        """Send the kept grammar rows' sampled tokens to the host, for their matchers to accept before the next
        mask (no wait here: the next step is launched first)."""
        if not self.matchers:
            return
        rows = [i for i in np.flatnonzero(kept) if int(slots[i]) in self.matchers]
        if not rows:
            return
        tokens = next_ids[torch.tensor(rows, device=next_ids.device)]
        event = None
        if self.device.type == "cuda":
            host = torch.empty(len(rows), dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = tokens
        self._pending.append(([self.matchers[int(slots[i])] for i in rows], host, event))

    def _accept_pending(self) -> None:
        for matchers, tokens, event in self._pending:
            if event is not None:
                event.synchronize()
            for matcher, token in zip(matchers, tokens.tolist(), strict=True):
                if not matcher.is_terminated() and not matcher.accept_token(token):
                    log.error("sampled token %d breaks its grammar (the invariant above is broken)", token)
        self._pending.clear()
