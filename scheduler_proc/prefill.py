"""Prefill steps: continue chunked prefills, then admit waiting requests under the step's token budget.

Order: the requests already prefilling (in admission order), then waiting ones by longest prefix match
in the radix cache, ties by arrival (FCFS past LPM_MAX_QUEUE waiting, where matching them all each step
would cost too much). No request starves under LPM: one that LPM_MAX_OVERTAKEN later arrivals have been
waiting beside is overdue, and overdue requests go first, in arrival order. A request is admitted only if
its prompt plus `new_token_ratio × max_new_tokens` fits beside what running requests still reserve; the first
that does not fit stops admission (no overtaking). A waiting request that shares DEFER_MIN_SHARED uncached
tokens with a prompt computed in this step waits for the next one, when that prefix is in the tree, instead
of computing it twice.
"""

from __future__ import annotations

import math
import time

import numpy as np

from radixserve.config import ServerArgs
from radixserve.wire import NewReq, i32
from scheduler_proc.block_table import BlockTable
from scheduler_proc.counters import Counters
from scheduler_proc.queues import RunningSet, WaitingQueue
from scheduler_proc.request import Req, Stage

LPM_MAX_QUEUE = 128
# Without it, requests that match nothing in the cache waited minutes behind a steady flow of ones that do
# (64 mixed clients for 3 minutes on 2 cores: p99 201 s, max 213 s; FCFS: max 65 s; with it: p99 63 s, max 66 s).
LPM_MAX_OVERTAKEN = 64
DEFER_MIN_SHARED = 16  # a waiting request sharing this many uncached tokens with one in the batch waits a step

Entries = list[tuple[Req, int]]  # (request, tokens it computes this step), in batch order


def match_key(req: Req) -> np.ndarray:
    """Tokens that may come from the cache: all but the last (which must produce logits), and none from
    where input logprobs are still wanted."""
    limit = req.fill_len - 1
    if req.wants_input_logprobs and not req.input_logprobs:
        limit = min(limit, max(req.logprob.logprob_start_len - 1, 0))
    return req.fill_ids()[:limit]


class ComputingPrompts:
    """Prompts computed in this step, for the shared-prefix deferral: `shares(head)` is whether one of them
    starts with `head`. Heads are indexed by length as lengths are asked for, so a step admitting k requests
    costs O(k × distinct lengths) hash look-ups, not k² array comparisons."""

    def __init__(self, prompts: list[np.ndarray]) -> None:
        self._prompts = prompts
        self._heads: dict[int, set[bytes]] = {}

    def __bool__(self) -> bool:
        return bool(self._prompts)

    def add(self, prompt: np.ndarray) -> None:
        self._prompts.append(prompt)
        for end, heads in self._heads.items():
            if len(prompt) >= end:
                heads.add(prompt[:end].tobytes())

    def shares(self, head: np.ndarray) -> bool:
        end = len(head)
        heads = self._heads.get(end)
        if heads is None:
            heads = self._heads[end] = {p[:end].tobytes() for p in self._prompts if len(p) >= end}
        return head.tobytes() in heads


class PrefillPlanner:
    """Picks a prefill step's work and moves admitted requests from `waiting` to `running`."""

    def __init__(self, args: ServerArgs, table: BlockTable, running: RunningSet, waiting: WaitingQueue,
                 counters: Counters) -> None:
        self.args = args
        self.table = table
        self.cache = table.cache
        self.use_cache = table.use_cache
        self.running = running
        self.waiting = waiting
        self.counters = counters

    def plan(self) -> tuple[Entries, list[NewReq]]:
        """The step's (request, chunk) entries and the NewReq of each request admitted in it; KV slots for every
        chunk are assigned. Empty when nothing can be prefilled."""
        budget = min(self.args.chunked_prefill_size, self.args.max_prefill_tokens)
        entries: Entries = []
        for req in self.running.prefilling:
            if budget <= 0:
                break
            n = min(req.fill_len - req.cached_len, budget)
            if not self.table.assign(req, n):
                break
            entries.append((req, n))
            budget -= n
        new_reqs: list[NewReq] = []
        if not self.waiting or budget <= 0 or not self.table.num_free_rows:
            return entries, new_reqs  # nothing can be admitted: no need to order the queue
        computing = ComputingPrompts([r.fill_ids() for r, _ in entries] if self.use_cache else [])
        reserved: int | None = None  # reserved_tokens(), summed once and then kept up to date
        for req in self.order_waiting():
            if budget <= 0 or not self.table.num_free_rows:
                break
            if req.pending:  # retracted while its last token was in flight: it comes back once that arrives
                continue
            if computing and self._shares_uncached_prefix(req, computing):
                continue
            if reserved is None:
                reserved = self.reserved_tokens()
            admitted = self._admit(req, budget, reserved)
            if admitted is None:
                break
            new_req, n = admitted
            reserved += self.future_need(req)
            if new_req is None:  # its prefix is on its way from the host tier: its KV is reserved, not computed yet
                continue
            if self.use_cache:
                computing.add(req.fill_ids())
            new_reqs.append(new_req)
            entries.append((req, n))
            budget -= n
        return entries, new_reqs

    def order_waiting(self) -> list[Req]:
        if self.args.schedule_policy == "lpm" and self.use_cache and 1 < len(self.waiting) <= LPM_MAX_QUEUE:
            newest = max(r.arrival for r in self.waiting)

            def key(r: Req) -> tuple[bool, int, int]:
                overdue = newest - r.arrival >= LPM_MAX_OVERTAKEN
                return not overdue, 0 if overdue else -self.cache.peek_prefix_len(match_key(r)), r.arrival

            return sorted(self.waiting, key=key)
        return list(self.waiting)

    def future_need(self, req: Req) -> int:
        """KV a running request is expected to still need: prefill left + reserved output."""
        prefill_left = req.fill_len - req.cached_len - (1 if req.stage == Stage.DECODE else 0)
        return prefill_left + math.ceil(req.remaining_new_tokens * self.args.new_token_ratio)

    def reserved_tokens(self) -> int:
        """What all running requests are expected to still need (O(running): once per admitting step)."""
        return sum(map(self.future_need, self.running))

    def _shares_uncached_prefix(self, req: Req, computing: ComputingPrompts) -> bool:
        """Whether `req` and a prompt being computed share DEFER_MIN_SHARED tokens past req's cached prefix."""
        key = match_key(req)
        end = self.cache.peek_prefix_len(key) + DEFER_MIN_SHARED
        return len(key) >= end and computing.shares(key[:end])

    def _admit(self, req: Req, budget: int, reserved: int) -> tuple[NewReq | None, int] | None:
        """Move `req` from waiting to running if its KV fits beside what running requests still need
        (`reserved`), holding its cached prefix; its first chunk gets KV slots. None if it does not fit. A request
        whose match is still loading from the host tier (the load this match started goes with the step being
        built, beside the requests it runs) stays waiting, (None, n): it is admitted by a step after the load is
        done, and nothing else waits for it."""
        if self.use_cache:
            match = self.cache.match_prefix(match_key(req))
            prefix, node = match.slots, match.node
            self.cache.lock(node)
        else:
            match, prefix, node = None, np.zeros(0, dtype=np.int32), None
        n = min(req.fill_len - len(prefix), budget)
        need = req.fill_len - len(prefix) + math.ceil(req.remaining_new_tokens * self.args.new_token_ratio)
        available = self.table.available()
        fits = need <= available - reserved or not self.running and n <= available
        if not fits or match is not None and match.loading:
            if node is not None:
                self.cache.unlock(node)
            if not fits:
                return None
            if not req.output_ids:  # reported at its first admission
                req.cached_tokens_host += match.loaded
            return None, n
        self.table.bind(req, prefix, node)
        if not req.output_ids:  # its first admission (a retracted request comes back with output)
            req.cached_tokens = len(prefix)
            self.counters.prompt_tokens += len(req.prompt_ids)
            self.counters.cached_tokens += len(prefix)
            req.cached_tokens_host = min(req.cached_tokens_host, len(prefix))  # loaded for it (evicted since: less)
            self.counters.cached_tokens_host += req.cached_tokens_host
            self.counters.cache_queries += 1
            self.counters.cache_hits += len(prefix) > 0
            if node is not None:
                self.cache.hit(node)  # once per request: write_through_selective copies prefixes hit often
            self.counters.queue_time.observe(time.monotonic() - req.queued_at)
        self.waiting.remove(req)
        self.running.add(req)
        if not self.table.assign(req, n):
            raise AssertionError("admission checked the KV that this chunk needs")
        sp = req.sampling
        wants_lp = req.wants_input_logprobs and not req.input_logprobs
        return NewReq(req_slot=req.req_slot, prefix_slots=prefix.tobytes(), temperature=sp.temperature,
                      top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p, seed=req.seed,
                      min_new_tokens=sp.min_new_tokens, stop_ids=i32(sorted(req.stop_ids)),
                      logprob=req.logprob,
                      prompt_ids=req.prompt_ids.tobytes() if wants_lp else None,
                      penalties=req.penalties, grammar=req.grammar,
                      # Per-request state that follows the output (penalty counts, the grammar matcher) is rebuilt
                      # from it at a re-admission (retraction); no output id is PENDING here (order_waiting).
                      output_ids=i32(req.output_ids) if req.output_ids and (req.penalties or req.grammar) else b""), n
