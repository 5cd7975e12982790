"""Speculative decoding, the scheduler's part (--speculative-algorithm NGRAM): which decoding requests draft,
their drafts, the KV slots of those drafts, and the verify step's answer applied to each request.

A verify step is an extend: request i computes its last token and d_i drafted tokens after it (StepBatch.draft_lens;
the workers accept them exactly: worker_proc/speculative.py) and gets back a_i accepted drafts plus one token
(StepResult.accept_lens). When the step is sent, the drafts and one PENDING token join its output as pending
entries and its KV advances over all 1 + d_i tokens (Scheduler._commit), as for any step; when the answer comes,
`settle` keeps a_i + 1 of them and returns the KV slots of the rejected drafts to the allocator at once. So the
radix cache only ever holds accepted tokens: a request that ends while its verify step is in flight drops its
pending entries and frees the KV past what it knows (BlockTable.trim), as with overlap scheduling.

What speculation turns off: overlap scheduling for the requests that speculate. A draft needs the request's
last token, so a request whose token is still in flight is held out of the next step (`hold`) and each verify
step is answered before that request's next step is built. Above --speculative-batch-size-threshold decoding
requests the step is plain decode, overlapped as before. A request with a grammar never drafts (its step row is a
plain decode inside the verify step).

Draft sources (`draft_source`):
- NGRAM: the drafts are what followed the most recent earlier occurrence of the longest suffix of the request's
  own tokens (prompt + output) of --speculative-ngram-min/max-match-window-size tokens; per request its tokens live
  in a growing buffer (`Req.history`), so drafting costs O(its length) in numpy and no Python per token.
- STANDALONE / EAGLE3: the workers' draft model or EAGLE-3 head drafts (worker_proc/draft_model.py,
  worker_proc/eagle3_draft.py): the scheduler reserves the KV slots
  of k drafts per request and sends PENDING in their place; the accepted ones come back with the verify step's
  answer like any sampled token.
- REPLAY (benchmarks only): what followed in a recorded sequence that starts with the request's prompt (a first
  run's greedy output: a draft that is always right for the same greedy request).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from radixserve.config import ServerArgs
from radixserve.wire import SpecCounts
from scheduler_proc.block_table import BlockTable
from scheduler_proc.counters import Counters
from scheduler_proc.request import PENDING, Req

MAX_CANDIDATES = 256  # most recent occurrences of the last token examined per draft
# Draft lengths that follow acceptance (Speculator.settle), where the drafts come from tokens (NGRAM, REPLAY) and
# the workers run on the CPU: there a verify row costs a good part of a decode step (its GEMMs are compute-bound
# from a few rows), so after a step that rejected a draft a request proposes at most accepted + 1 drafts (at least
# MIN_DRAFTS), and after a step that accepted all its d drafts at most d + GROW, up to k. On a GPU the rows of a small
# batch cost about nothing beside the weights' read and every request proposes k.
MIN_DRAFTS, GROW = 3, 4


class TokenHistory:
    """A request's known tokens (prompt, then output), appended as they become known."""

    def __init__(self, prompt: np.ndarray) -> None:
        self.buf = np.empty(max(2 * len(prompt), 64), dtype=np.int32)
        self.buf[:len(prompt)] = prompt
        self.len = len(prompt)

    def sync(self, req: Req) -> np.ndarray:
        """The request's tokens now (every output known: no step of it in flight)."""
        known = len(req.prompt_ids) + len(req.output_ids)
        if known > len(self.buf):
            self.buf = np.concatenate([self.buf[:self.len], np.empty(known, dtype=np.int32)])
        if known > self.len:
            self.buf[self.len:known] = req.output_ids[self.len - len(req.prompt_ids):]
        self.len = known
        return self.buf[:known]


def ngram_draft(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> np.ndarray:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix of `tokens` of min_n
    to max_n tokens (empty without one)."""
    n_tok = len(tokens)
    if n_tok < 2 or k <= 0:
        return tokens[:0]
    cands = np.flatnonzero(tokens[:-1] == tokens[-1])[-MAX_CANDIDATES:]  # ends of matches, oldest first
    if not len(cands):
        return tokens[:0]
    matched = np.ones(len(cands), dtype=np.int64)
    alive = np.ones(len(cands), dtype=bool)
    for t in range(1, min(max_n, n_tok - 1)):
        back = cands - t
        alive &= back >= 0
        alive[alive] &= tokens[back[alive]] == tokens[n_tok - 1 - t]
        if not alive.any():
            break
        matched += alive
    best = int(matched.max())
    if best < min_n:
        return tokens[:0]
    end = int(cands[np.flatnonzero(matched == best)[-1]])  # the most recent of the longest
    return tokens[end + 1:min(end + 1 + k, n_tok)]


DraftSource = Callable[[Req, int], np.ndarray]  # (request, most drafts) -> its drafts (PENDING: the workers')


def ngram_source(args: ServerArgs) -> DraftSource:
    min_n, max_n = args.speculative_ngram_min_match_window_size, args.speculative_ngram_max_match_window_size

    def draft(req: Req, limit: int) -> np.ndarray:
        if req.history is None:
            req.history = TokenHistory(req.prompt_ids)
        return ngram_draft(req.history.sync(req), limit, min_n, max_n)
    return draft


def replay_source(path: str) -> DraftSource:
    """Drafts from recorded sequences (REPLAY), found by the request's prompt."""
    with open(path) as f:
        recorded = [np.asarray(seq, dtype=np.int32) for seq in json.load(f)]
    by_start = {seq[:8].tobytes(): [] for seq in recorded}
    for seq in recorded:
        by_start[seq[:8].tobytes()].append(seq)

    def draft(req: Req, limit: int) -> np.ndarray:
        n_prompt, known = len(req.prompt_ids), len(req.prompt_ids) + len(req.output_ids)
        for seq in by_start.get(req.prompt_ids[:8].tobytes(), ()):
            if len(seq) > n_prompt and np.array_equal(seq[:n_prompt], req.prompt_ids):
                return seq[known:known + limit]
        return np.zeros(0, dtype=np.int32)
    return draft


def draft_source(args: ServerArgs) -> DraftSource:
    if args.speculative_algorithm == "NGRAM":
        return ngram_source(args)
    if args.speculative_algorithm == "REPLAY":
        return replay_source(args.speculative_replay_path)
    return lambda req, limit: np.full(limit, PENDING, dtype=np.int32)  # a draft model's, in the workers


class Speculator:
    """Drafts for a decode step's requests and their KV slots; a verify step's answer applied to each."""

    def __init__(self, args: ServerArgs, table: BlockTable, counters: Counters, context_length: int,
                 device: str = "cpu") -> None:
        self.k = args.speculative_num_draft_tokens - 1
        self.source = draft_source(args)
        self.adapts = device == "cpu" and args.speculative_algorithm in ("NGRAM", "REPLAY")
        self.threshold = args.speculative_batch_size_threshold
        self.table = table
        self.counters = counters
        self.context_length = context_length

    @staticmethod
    def drafts_for(req: Req) -> bool:
        return req.grammar is None  # a grammar's request runs without speculation

    def hold(self, decoding: list[Req]) -> list[Req]:
        """The requests of the next step: all of `decoding` above the batch threshold (plain decode); else all but
        those that would draft and whose last token is still in flight."""
        if len(decoding) > self.threshold:
            return decoding
        return [r for r in decoding if not (r.pending and self.drafts_for(r))]

    def draft(self, reqs: list[Req]) -> list[np.ndarray] | None:
        """Drafts for each request of a decode step (which holds one KV slot for its last token already), their
        KV slots written after it in the block table; None when nothing drafts (a plain decode step)."""
        if len(reqs) > self.threshold:
            return None
        drafts = []
        for req in reqs:
            d = np.zeros(0, dtype=np.int32)
            if self.drafts_for(req) and not req.pending:
                limit = min(self.k, req.draft_cap, req.remaining_new_tokens - 1, self.context_length - req.fill_len - 1)
                d = self.source(req, limit) if limit > 0 else d
                slots = self.table.alloc(len(d)) if len(d) else None
                if slots is None:
                    d = d[:0]
                else:
                    self.table.req_to_token[req.req_slot, req.cached_len + 1:req.cached_len + 1 + len(d)] = slots
            drafts.append(d)
        return drafts if any(len(d) for d in drafts) else None

    def settle(self, req: Req, k: int, drafted: int, accepted: int) -> None:
        """A verify step's answer for `req` (its outputs from index k were the drafts and a PENDING token): keep
        accepted + 1 pending entries (the caller writes their tokens) and free the rejected drafts' KV slots."""
        rejected = drafted - accepted
        del req.output_ids[k + accepted + 1:k + 1 + drafted]
        req.pending -= rejected
        if rejected:
            end = req.cached_len
            req.cached_len -= rejected
            self.table.allocator.free(self.table.req_to_token[req.req_slot, req.cached_len:end].copy())
        req.verifying = False
        if self.adapts and drafted:
            req.draft_cap = min(self.k, drafted + GROW) if accepted == drafted else max(MIN_DRAFTS, accepted + 1)
        if req.spec is None:
            req.spec = SpecCounts()
        req.spec.spec_verify_ct += 1
        req.spec.spec_draft_token_num += drafted
        req.spec.spec_accept_token_num += accepted
        self.counters.spec_accept_length.observe(accepted + 1)
