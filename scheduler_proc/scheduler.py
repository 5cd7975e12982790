"""The scheduler: its state, and the calls the process loop (scheduler_proc/main.py) makes.

State lives here — the waiting queue and running set (queues.py), the radix cache and KV slot allocator,
the block table (block_table.py), sessions (sessions.py), counters (counters.py), the requests by rid and the one
path that ends them (lifecycle.py) — and policy beside it: prefill.py picks prefill steps (admission, chunking,
LPM), decode.py decode steps (and retraction), prefix_groups.py the decode batch's shared-prefix groups. Each call
returns an Outcome (lifecycle.py) that the process loop sends as it is. No sockets here and no tensors: the
scheduler decides what runs, the workers compute it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque

import numpy as np

from radixserve.config import ServerArgs
from radixserve.kv_events import KVEventsConfig
from radixserve.wire import (
    FinishReason,
    GenerateTokens,
    KVMove,
    Rejected,
    SchedulerStats,
    StepBatch,
    StepResult,
    from_i32,
    i32,
)
from scheduler_proc.block_table import BlockTable
from scheduler_proc.counters import Counters
from scheduler_proc.decode import DecodePlanner
from scheduler_proc.grammar_gate import GrammarGate
from scheduler_proc.host_tier import HostTier, host_stats
from scheduler_proc.kv_blocks import BlockEvents
from scheduler_proc.kv_slots import KVSlotAllocator
from scheduler_proc.lifecycle import Lifecycle, Outcome
from scheduler_proc.outputs import add_input_logprobs, check_finish, make_out, report, take_outputs
from scheduler_proc.prefill import Entries, PrefillPlanner
from scheduler_proc.prefix_groups import PrefixGrouper
from scheduler_proc.queues import RunningSet, WaitingQueue
from scheduler_proc.radix_cache import RadixCache
from scheduler_proc.request import PENDING, Req, Stage
from scheduler_proc.request_checks import RequestError, penalties_of, token_array
from scheduler_proc.sessions import SessionError, SessionTable
from scheduler_proc.speculative import Speculator

log = logging.getLogger("radixserve.scheduler")

CHUNK, NO_SAMPLE = -2, -1  # InFlight.sampled for an entry that samples nothing: a prefill chunk, a prompt only


@dataclasses.dataclass(slots=True)
class InFlight:
    """A step sent to the workers and not yet answered: its entries, their req slots as sent, and the output
    index each one samples."""

    step: int
    entries: Entries
    req_slots: np.ndarray
    sampled: list[int]


class Scheduler:
    """One scheduler's state, and the calls the process loop makes between and around steps."""

    def __init__(self, args: ServerArgs, num_kv_slots: int, context_length: int, vocab_size: int = 1 << 31,
                 cascade_attention: bool = True, num_host_kv_slots: int = 0, device: str = "cpu") -> None:
        self.args = args
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.allocator = KVSlotAllocator(num_kv_slots)
        events = KVEventsConfig.parse(args.kv_events_config) if args.kv_events_config else None
        # The host tier (--enable-hierarchical-cache): the workers' host pool has num_host_kv_slots (RuntimeInfo).
        self.cache = RadixCache(self.allocator,
                                BlockEvents(events.block_size) if events is not None and events.enabled else None,
                                HostTier(num_host_kv_slots, args.hicache_write_policy) if num_host_kv_slots else None)
        self.use_cache = not args.disable_radix_cache
        # Prefix groups only for workers that use them (`cascade_attention`: RuntimeInfo); without the radix
        # cache no two requests share KV, so there is nothing to group.
        self.grouper = (PrefixGrouper() if cascade_attention and self.use_cache and not args.disable_cascade_attention
                        else None)
        self.sessions = SessionTable(self.cache if self.use_cache else None, args.session_kv_budget, args.max_sessions)
        self.counters = Counters()
        self.table = BlockTable(args.max_running_requests, context_length, self.allocator, self.cache, self.use_cache,
                                self.counters)
        self.waiting = WaitingQueue()
        self.running = RunningSet()
        self.grammars = GrammarGate()  # requests waiting for their grammar to compile
        self.lifecycle = Lifecycle(self.table, self.running, self.waiting, self.grammars, self.sessions,
                                   self.counters)
        self.prefill = PrefillPlanner(args, self.table, self.running, self.waiting, self.counters)
        self.spec = (Speculator(args, self.table, self.counters, context_length, device)
                     if args.speculative_algorithm is not None else None)
        self.decode = DecodePlanner(self.table, self.running, self.lifecycle, self.spec)
        self.arrivals = 0
        self.step_id = 0
        self.inflight: deque[InFlight] = deque()  # steps sent, oldest first (two with overlap scheduling)
        self._flushes = 0
        self._invariants = "unchecked"  # the last maybe_check_invariants() result
        self._invariants_epoch: tuple[int, ...] | None = None  # the state it was checked in

    # ------------------------------------------------------------ requests in

    def submit(self, msg: GenerateTokens) -> Outcome:
        """Take a request: nothing to send, or its rejection (`add_request`)."""
        try:
            self.add_request(msg)
        except RequestError as e:
            return Outcome(replies=[(msg.reply_to, Rejected(msg.rid, e.status, str(e)))])
        return Outcome()

    def add_request(self, msg: GenerateTokens) -> None:
        """Queue a request (or hold it for its grammar); raises RequestError if it can never be served."""
        if msg.rid in self.lifecycle.reqs:
            raise RequestError(f"request id {msg.rid!r} is already in use")
        sp = msg.sampling
        if len(self.waiting) + len(self.grammars) >= self.args.max_queued_requests:
            raise RequestError(f"the waiting queue is full ({self.args.max_queued_requests} requests)", status=503)
        if not msg.input_ids:
            raise RequestError("the prompt is empty")
        prompt = token_array(msg.input_ids, self.vocab_size)
        token_array(sp.stop_token_ids, self.vocab_size)
        grammar, penalties = sp.grammar(), penalties_of(sp, self.vocab_size)
        if grammar is not None and self.args.grammar_backend == "none":
            raise RequestError(f"{grammar.kind} needs structured output, which this server runs without "
                               "(--grammar-backend none)")
        if grammar is not None and self.grammars.error(grammar) is not None:
            raise RequestError(self.grammars.error(grammar))
        if msg.session is not None:
            try:
                prompt = self.sessions.start_turn(msg.rid, msg.session, prompt, msg.turn_end_ids)
            except SessionError as e:
                raise RequestError(str(e), e.status) from e
        try:
            self._check_fits(len(prompt), sp.max_new_tokens)
        except RequestError:
            self.sessions.end_turn(msg.rid, None, None)
            raise
        stop_ids = set(sp.stop_token_ids)
        if not sp.ignore_eos or grammar is not None:  # a grammar's end is an EOS (ignore_eos does not apply)
            stop_ids.update(msg.eos_token_ids)
        req = Req(rid=msg.rid, prompt_ids=prompt, sampling=sp, reply_to=msg.reply_to, stop_ids=frozenset(stop_ids),
                  arrival=self.arrivals, logprob=msg.logprob, seed=sp.seed if sp.seed is not None else -1,
                  session_id=msg.session.id if msg.session else None,
                  grammar=grammar, penalties=penalties, queued_at=time.monotonic(), report_interval=msg.report_interval)
        self.arrivals += 1
        self.lifecycle.begin(req)

    def _check_fits(self, n_prompt: int, max_new_tokens: int) -> None:
        if n_prompt + max_new_tokens > self.context_length:
            raise RequestError(
                f"prompt ({n_prompt} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                f"context length ({self.context_length} tokens)")
        if n_prompt + 1 > self.allocator.capacity:
            raise RequestError(f"prompt ({n_prompt} tokens) exceeds the KV cache ({self.allocator.capacity} tokens)")

    def abort(self, rid: str, finish: FinishReason | None = None) -> Outcome:
        """End a request now (nothing if it ended already): as `finish` says (a stop string, or an abort with its
        message), else as aborted."""
        outcome = Outcome()
        req = self.lifecycle.reqs.get(rid)
        if req is not None:
            self.lifecycle.end(req, finish or FinishReason(type="abort", message="aborted"), outcome)
        return outcome

    def shutdown(self) -> Outcome:
        """The server is stopping: end every request, each answered as aborted, and cancel the host tier's loads in
        flight, which no step will see done (O(requests), once): nothing is left holding KV."""
        outcome = Outcome()
        for req in list(self.lifecycle.reqs.values()):
            self.lifecycle.end(req, FinishReason(type="abort", message="the server is shutting down"), outcome)
        self.cache.cancel_loads()
        return outcome

    # ------------------------------------------------------------ steps

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.grammars.busy or self.cache.loads_in_flight)

    def schedule(self) -> Outcome:
        """Pick the next step (Outcome.batch; None when there is nothing to run): prefill (new or chunked) first,
        else one decode for all running. The step counts as done once sent (see Req): KV and outputs advance
        now, its sampled tokens are PENDING until `process_result`, and a decode input that is still PENDING
        travels as -1 (the workers substitute the token they sampled last for that req slot)."""
        outcome = Outcome()
        entries, new_reqs = self.prefill.plan()
        is_decode, drafts = False, None
        if not entries:
            decoding, stuck = self.decode.plan()
            # Alone and out of KV: it can never grow, so it ends here (not while a load in flight holds KV it may get).
            if stuck is not None and not stuck.pending and not self.cache.loads_in_flight:
                if self.sessions.give_way():  # unless session pins hold KV it could have
                    return self.schedule()
                self.lifecycle.end(stuck, FinishReason(type="length", length=stuck.num_outputs), outcome)
            drafts = self.spec.draft(decoding) if self.spec is not None and decoding else None
            entries = [(req, 1 + (len(drafts[j]) if drafts else 0)) for j, req in enumerate(decoding)]
            is_decode = drafts is None  # else a verify step: each request's last token and its drafts
            if not entries and self.waiting:  # decode may have freed KV for a waiting request
                entries, new_reqs = self.prefill.plan()
                is_decode = False
        if not entries:
            # Nothing in flight to free KV, requests that need some, and session pins hold some: pins give way.
            loading = self.cache.loads_in_flight
            if not self.inflight and not loading and (self.running or self.waiting) and self.sessions.give_way():
                return self.schedule()
            if not self.grammars.busy and (self.inflight or not loading):
                return outcome
            # Only requests waiting for a grammar, or for a load that no step in flight may report done: a step of no
            # requests carries new compile jobs (and the loads), and its answer comes when the loads and a compile
            # are done (or after a short wait), so this loop does not spin.
            self.step_id += 1
            self.inflight.append(InFlight(self.step_id, [], np.zeros(0, np.int32), []))
            outcome.batch = StepBatch(step=self.step_id, is_decode=True, req_slots=b"", input_ids=b"",
                                      cached_lens=b"", extend_lens=b"", out_slots=b"", sample_offsets=b"",
                                      new_reqs=[], grammars=self.grammars.take_jobs(), **self._tier_io())
            return outcome
        self.step_id += 1
        reqs = [req for req, _ in entries]
        req_slots = np.array([req.req_slot for req in reqs], dtype=np.int32)
        cached = np.array([req.cached_len for req in reqs], dtype=np.int32)
        extend = np.array([n for _, n in entries], dtype=np.int32)
        if is_decode:  # one new token each, the last it produced (cached_len == fill_len - 1), maybe PENDING
            ids = np.array([req.output_ids[-1] for req in reqs], dtype=np.int32)
        elif drafts is not None:
            ids = np.concatenate([np.concatenate([[req.output_ids[-1]], d]) for req, d in zip(reqs, drafts)])
        else:
            ids = np.concatenate([req.token_slice(req.cached_len, req.cached_len + n) for req, n in entries])
        # The new tokens' KV slots: req_to_token[slot, cached:cached + extend] of each request, in order.
        starts = np.cumsum(extend) - extend
        columns = np.arange(len(ids), dtype=np.int32) + np.repeat(cached - starts, extend)
        out_slots = self.table.req_to_token[np.repeat(req_slots, extend), columns]
        groups = self.grouper.groups(self.table.req_to_token, reqs) if is_decode and self.grouper else None
        self.counters.cascade_decode_steps += groups is not None
        sampled = [self._commit(req, n, d) for (req, n), d in zip(entries, drafts or [None] * len(entries))]
        outcome.batch = StepBatch(
            step=self.step_id, is_decode=is_decode, req_slots=req_slots.tobytes(),
            input_ids=ids.astype(np.int32).tobytes(), cached_lens=cached.tobytes(), extend_lens=extend.tobytes(),
            out_slots=out_slots.tobytes(), sample_offsets=i32([max(k, -1) for k in sampled]), new_reqs=new_reqs,
            prefix_groups=b"" if groups is None else groups.tobytes(), grammars=self.grammars.take_jobs(),
            draft_lens=b"" if drafts is None else i32([len(d) for d in drafts]), **self._tier_io())
        self.inflight.append(InFlight(self.step_id, entries, req_slots, sampled))
        return outcome

    def _tier_io(self) -> dict[str, list[KVMove] | bytes]:
        """The host tier's part of the step being sent: the copies decided since the last step (started before its
        forward) and the loads done since, which its forward waits for (host_tier.py)."""
        host = self.cache.host
        return {} if host is None else {"kv_moves": host.take_moves(), "load_waits": host.take_load_waits()}

    def _commit(self, req: Req, n: int, drafts: np.ndarray | None = None) -> int:
        """Advance `req` past its part of a step being sent; the output index it samples, or NO_SAMPLE. A verify
        step's drafts join the output as pending entries before its PENDING token (speculative.py)."""
        req.cached_len += n
        if req.stage == Stage.PREFILL:
            if self.use_cache:
                self.table.cache_computed(req)
            if req.cached_len < req.fill_len:
                return CHUNK  # a chunk of a longer prefill: its sample is not used
            self.running.prefilled(req)
        if req.remaining_new_tokens <= 0:
            return NO_SAMPLE  # max_new_tokens 0: the prompt only
        k = len(req.output_ids)
        if drafts is not None and len(drafts):  # a verify step's drafts, then the token after them
            req.output_ids.extend(drafts.tolist())
            req.pending, req.verifying = req.pending + len(drafts), True
        req.output_ids.append(PENDING)
        req.pending += 1
        return k

    def process_result(self, result: StepResult) -> Outcome:
        """Apply the workers' answer to the oldest step in flight: the outputs to send, in batch order, and the
        rejections of requests whose grammar is invalid or that the workers could not admit.

        Invariant: a request never gets a token after its finish — one that ended while the step was in flight
        (finished, aborted, stopped by a stop string) is skipped, and its later PENDING tokens are dropped."""
        flight = self.inflight.popleft()
        assert result.step == flight.step, "worker answered a different step"
        outcome = Outcome()
        if result.loads_done:  # their requests are admitted from the next step on
            self.cache.finish_loads(from_i32(result.loads_done))
        if result.grammars_done:
            self._grammars_done(result, outcome)
        if not flight.entries:
            return outcome
        self.counters.forward_steps += 1
        if result.admit_errors:
            self._admit_errors(flight, result, outcome)
        next_ids = np.frombuffer(result.next_ids, dtype=np.int32).tolist()
        next_lps = np.frombuffer(result.next_logprobs, dtype=np.float32).tolist()
        # Where each request's tokens are in next_ids: one each, or a verify step's accepted drafts + 1.
        accepted = np.frombuffer(result.accept_lens, dtype=np.int32) if result.accept_lens else None
        counts = np.ones(len(flight.entries), np.int64) if accepted is None else accepted.astype(np.int64) + 1
        firsts = (np.cumsum(counts) - counts).tolist()
        for i, ((req, n), k) in enumerate(zip(flight.entries, flight.sampled)):
            if req.stage == Stage.FINISHED:
                continue
            if i in result.input_logprobs:
                add_input_logprobs(req, result, i)
            if k == CHUNK:
                continue
            new_ids: list[int] = []
            flat = range(firsts[i], firsts[i] + int(counts[i]))
            if k != NO_SAMPLE:
                if accepted is not None and n > 1:  # a request that drafted n - 1 tokens
                    self.spec.settle(req, k, n - 1, int(accepted[i]))
                new_ids, finish = take_outputs(req, k, next_ids[flat.start:flat.stop], self.context_length)
                num_outputs = k + len(new_ids)
            else:
                num_outputs = req.num_outputs
                finish = check_finish(req, num_outputs, self.context_length)
            self.counters.generated_tokens += len(new_ids)
            # The message of the first output (or of a prompt-only request) carries its input logprobs.
            out = make_out(req, new_ids, finish, first=k == 0 or (k == NO_SAMPLE and num_outputs == 0))
            if req.logprob is not None and new_ids:
                out.output_logprobs = next_lps[flat.start:flat.start + len(new_ids)]
                if flat.start in result.top_logprobs:
                    out.output_top_logprobs = [result.top_logprobs[f] for f in flat[:len(new_ids)]]
            if finish is None:
                if (due := report(req, out)) is not None:
                    outcome.outs.append((req.reply_to, due))
            else:
                self.lifecycle.end(req, finish, outcome, last=out)
        return outcome

    def _grammars_done(self, result: StepResult, outcome: Outcome) -> None:
        """Queue the requests whose grammar compiled; reject those whose grammar is invalid."""
        ready, rejected = self.grammars.done(result.grammars_done)
        for req in ready:
            self.waiting.push_back(req)
        for req, error in rejected:
            self.lifecycle.end(req, FinishReason(type="abort", message=error), outcome, status=400)

    def _admit_errors(self, flight: InFlight, result: StepResult, outcome: Outcome) -> None:
        """End each request whose parameters the workers could not apply in this step (ModelRunner._admit) with a
        400 and their message; the step's other requests go on, and one that ended meanwhile stays ended. (Values
        are checked where they are parsed and again where a message is decoded, so this is the last line of
        defence: a worker never dies of one request's values.)"""
        row = {slot: i for i, slot in enumerate(flight.req_slots.tolist())}  # O(batch), only when one failed
        for slot, message in result.admit_errors:
            req = flight.entries[row[slot]][0]
            if req.stage != Stage.FINISHED:
                self.lifecycle.end(req, FinishReason(type="abort", message=message), outcome, status=400)

    # ------------------------------------------------------------ control

    def flush_cache(self) -> bool:
        if self.running:
            return False
        self.sessions.unpin_all()
        self.cache.reset()
        self._flushes += 1
        return True

    def check_invariants(self) -> None:
        """Walk the whole state (O(cache size)) between steps and assert what each part keeps: the KV slot
        partition (block_table.py), the tree (radix_cache.py), the queues (queues.py), the sessions' pins, every
        request in the one place its stage names (lifecycle.py)."""
        assert not self.inflight, "check_invariants runs between steps"
        running = list(self.running)
        self.table.check_invariants(running)
        self.running.check_invariants()
        self.waiting.check_invariants()
        self.sessions.check_invariants()
        self.lifecycle.check_invariants()

    def maybe_check_invariants(self) -> str:
        """"ok", "violated: <message>" or "unchecked". With --enable-invariant-checks, check_invariants() runs
        here when the scheduler is idle between steps (nothing running or in flight) and its state changed
        since the last check; else this returns the last result at once."""
        if not self.args.enable_invariant_checks or self.running or self.inflight:
            return self._invariants
        epoch = (self.step_id, self.counters.finished_requests, self.counters.aborted_requests, self._flushes,
                 self.sessions.pin_changes)
        if epoch != self._invariants_epoch:
            try:
                self.check_invariants()
                self._invariants = "ok"
            except AssertionError as e:
                self._invariants = f"violated: {e}"
                log.error("scheduler invariants violated: %s", e)
            self._invariants_epoch = epoch
        return self._invariants

    def info(self) -> SchedulerStats:
        """Gauges and counters, O(1)."""
        cap = self.allocator.capacity
        free, evictable = self.allocator.num_free, self.cache.evictable_size
        return SchedulerStats(
            num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting), max_total_num_tokens=cap,
            kv_free_tokens=free, kv_cached_tokens=self.cache.total_size, kv_evictable_tokens=evictable,
            token_usage=round((cap - free - evictable) / cap, 4), num_sessions=len(self.sessions.sessions),
            session_pinned_tokens=self.sessions.pinned_tokens, session_kv_budget=self.sessions.budget,
            kv_event_blocks=self.cache.events.num_blocks if self.cache.events is not None else 0,
            **host_stats(self.cache.host),
            **dataclasses.asdict(self.counters))
