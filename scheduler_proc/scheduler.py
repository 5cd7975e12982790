"""Scheduler state and policy: queues, the radix cache, KV slots and the req_to_token block table.

No sockets here (see scheduler_proc/main.py) and no tensors: the scheduler decides what runs,
the workers compute it.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import numpy as np

from radixserve.config import ServerArgs
from radixserve.wire import (
    FinishReason,
    GenerateTokens,
    NewReq,
    ReqOut,
    StepBatch,
    StepResult,
    i32,
)
from scheduler_proc.kv_slots import KVSlotAllocator
from scheduler_proc.prefix_groups import PrefixGrouper
from scheduler_proc.radix_cache import RadixCache
from scheduler_proc.request import Req, Stage
from scheduler_proc.sessions import SessionError, SessionTable

log = logging.getLogger("radixserve.scheduler")


LPM_MAX_QUEUE = 128
DEFER_MIN_SHARED = 16  # a waiting request sharing this many uncached tokens with one in the batch waits a step
Routed = tuple[int, ReqOut]  # (reply_to, output)


class RequestError(ValueError):
    """A request that can never run (too long, bad parameters); `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Scheduler:
    def __init__(self, args: ServerArgs, num_kv_slots: int, context_length: int, vocab_size: int = 1 << 31,
                 cascade_attention: bool = True) -> None:
        self.args = args
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.allocator = KVSlotAllocator(num_kv_slots)
        self.cache = RadixCache(self.allocator)
        self.use_cache = not args.disable_radix_cache
        # Prefix groups only for workers that use them (`cascade_attention`: WorkerReady); without the radix
        # cache no two requests share KV, so there is nothing to group.
        self.grouper = (PrefixGrouper() if cascade_attention and self.use_cache and not args.disable_cascade_attention
                        else None)
        self.sessions = SessionTable(self.cache if self.use_cache else None, args.session_kv_budget, args.max_sessions)
        # Block table: req_to_token[req_slot, pos] is the KV slot of token `pos` of that request.
        self.req_to_token = np.zeros((args.max_running_requests, context_length), dtype=np.int32)
        self.free_req_slots = list(range(args.max_running_requests - 1, -1, -1))
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admitted, in admission order
        self.reqs: dict[str, Req] = {}
        self.arrivals = 0
        self.step_id = 0
        self.inflight: list[tuple[Req, int]] = []
        self.pending_outs: list[Routed] = []  # produced outside a step (a request that can never fit)
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                      "finished_requests": 0, "aborted_requests": 0, "retracted_requests": 0,
                      "forward_steps": 0, "cascade_decode_steps": 0}

    # ------------------------------------------------------------ requests in

    def add_request(self, msg: GenerateTokens) -> None:
        """Queue a request; raises RequestError if it can never be served."""
        if msg.rid in self.reqs:
            raise RequestError(f"request id {msg.rid!r} is already in use")
        sp = msg.sampling
        if len(self.waiting) >= self.args.max_queued_requests:
            raise RequestError(f"the waiting queue is full ({self.args.max_queued_requests} requests)", status=503)
        if not msg.input_ids:
            raise RequestError("the prompt is empty")
        bad = [t for t in (*msg.input_ids, *sp.stop_token_ids) if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        prompt = np.asarray(msg.input_ids, dtype=np.int32)
        if msg.session is not None:
            try:
                prompt = self.sessions.start_turn(msg.rid, msg.session, msg.input_ids, msg.turn_end_ids)
            except SessionError as e:
                raise RequestError(str(e), e.status) from e
        try:
            self._check_fits(len(prompt), sp.max_new_tokens)
        except RequestError:
            self.sessions.end_turn(msg.rid, None, None)
            raise
        stop_ids = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            stop_ids.update(msg.eos_token_ids)
        req = Req(rid=msg.rid, prompt_ids=prompt, sampling=sp, reply_to=msg.reply_to, stop_ids=frozenset(stop_ids),
                  arrival=self.arrivals, logprob=msg.logprob, seed=sp.seed if sp.seed is not None else -1,
                  session_id=msg.session.id if msg.session else None)
        self.arrivals += 1
        self.reqs[req.rid] = req
        self.waiting.append(req)

    def _check_fits(self, n_prompt: int, max_new_tokens: int) -> None:
        if n_prompt + max_new_tokens > self.context_length:
            raise RequestError(
                f"prompt ({n_prompt} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                f"context length ({self.context_length} tokens)")
        if n_prompt + 1 > self.allocator.capacity:
            raise RequestError(f"prompt ({n_prompt} tokens) exceeds the KV cache ({self.allocator.capacity} tokens)")

    def abort(self, rid: str, finish: FinishReason | None = None) -> Routed | None:
        """End a request now; `finish` marks a normal end (a stop string), else it is an abort."""
        req = self.reqs.get(rid)
        if req is None:
            return None
        if req.stage == Stage.WAITING:
            self.waiting.remove(req)
        else:
            if finish is not None and finish.length is not None:
                self._truncate_output(req, finish.length)
            self._release(req)
        req.finish = finish or FinishReason(type="abort", message="aborted")
        self._end_session_turn(req)
        self.stats["aborted_requests" if finish is None else "finished_requests"] += 1
        del self.reqs[rid]
        req.stage = Stage.FINISHED
        return req.reply_to, self._out(req, [])

    # ------------------------------------------------------------ scheduling

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepBatch | None:
        """Pick the next step: prefill (new or chunked) first, else one decode for all running."""
        entries, new_reqs = self._schedule_prefill()
        is_decode = False
        if not entries:
            entries, is_decode = self._schedule_decode(), True
            if not entries and self.waiting:  # decode may have freed KV for a waiting request
                entries, new_reqs = self._schedule_prefill()
                is_decode = False
        if not entries:
            return None
        self.inflight = entries
        self.step_id += 1
        reqs = [req for req, _ in entries]
        req_slots = np.array([req.req_slot for req in reqs], dtype=np.int32)
        cached = np.array([req.cached_len for req in reqs], dtype=np.int32)
        extend = np.array([n for _, n in entries], dtype=np.int32)
        if is_decode:  # one new token each, the last it produced (cached_len == fill_len - 1)
            ids = np.array([req.output_ids[-1] for req in reqs], dtype=np.int32)
        else:
            ids = np.concatenate([req.token_slice(req.cached_len, req.cached_len + n) for req, n in entries])
        # The new tokens' KV slots: req_to_token[slot, cached:cached + extend] of each request, in order.
        starts = np.cumsum(extend) - extend
        columns = np.arange(len(ids), dtype=np.int32) + np.repeat(cached - starts, extend)
        out_slots = self.req_to_token[np.repeat(req_slots, extend), columns]
        groups = self.grouper.groups(self.req_to_token, reqs) if is_decode and self.grouper else None
        self.stats["cascade_decode_steps"] += groups is not None
        return StepBatch(step=self.step_id, is_decode=is_decode, req_slots=req_slots.tobytes(),
                         input_ids=ids.astype(np.int32).tobytes(), cached_lens=cached.tobytes(),
                         extend_lens=extend.tobytes(), out_slots=out_slots.tobytes(),
                         sample_offsets=i32([len(req.output_ids) for req in reqs]), new_reqs=new_reqs,
                         prefix_groups=b"" if groups is None else groups.tobytes())

    def _reserved_tokens(self) -> int:
        """KV the running requests are expected to still need (prefill left + reserved output)."""
        return sum(self._future_need(r) for r in self.running)

    def _future_need(self, req: Req) -> int:
        prefill_left = req.fill_len - req.cached_len - (1 if req.stage == Stage.DECODE else 0)
        return prefill_left + math.ceil(req.remaining_new_tokens * self.args.new_token_ratio)

    def _available(self) -> int:
        return self.allocator.num_free + self.cache.evictable_size

    def _alloc(self, n: int) -> np.ndarray | None:
        if self.allocator.num_free < n:
            self.cache.evict(n - self.allocator.num_free)
        return self.allocator.alloc(n)

    def _order_waiting(self) -> list[Req]:
        # Matching every waiting request each step costs too much on a long queue: then FCFS.
        if self.args.schedule_policy == "lpm" and self.use_cache and 1 < len(self.waiting) <= LPM_MAX_QUEUE:
            return sorted(self.waiting, key=lambda r: (-self.cache.peek_prefix_len(self._match_key(r)), r.arrival))
        return list(self.waiting)

    def _match_key(self, req: Req) -> np.ndarray:
        """Tokens that may come from the cache: all but the last (which must produce logits)."""
        limit = req.fill_len - 1
        if req.wants_input_logprobs and not req.input_logprobs:
            limit = min(limit, max(req.logprob.logprob_start_len - 1, 0))
        return req.fill_ids()[:limit]

    def _schedule_prefill(self) -> tuple[list[tuple[Req, int]], list[NewReq]]:
        budget = min(self.args.chunked_prefill_size, self.args.max_prefill_tokens)
        entries: list[tuple[Req, int]] = []
        for req in self.running:
            if req.stage == Stage.PREFILL and budget > 0:
                n = min(req.fill_len - req.cached_len, budget)
                if not self._assign_slots(req, n):
                    break
                entries.append((req, n))
                budget -= n
        new_reqs: list[NewReq] = []
        if not self.waiting or budget <= 0 or not self.free_req_slots:
            return entries, new_reqs  # nothing can be admitted: no need to order the queue
        # Prompts being computed now: a waiting request that shares an uncached prefix with one of
        # them waits for the next step, when that prefix is in the tree, instead of computing it twice.
        computing = [r.fill_ids() for r, _ in entries] if self.use_cache else []
        reserved: int | None = None  # _reserved_tokens(), summed once and then kept up to date
        for req in self._order_waiting():
            if budget <= 0 or not self.free_req_slots:
                break
            if computing and self._shares_uncached_prefix(req, computing):
                continue
            if reserved is None:
                reserved = self._reserved_tokens()
            admitted = self._admit(req, budget, reserved)
            if admitted is None:
                break
            new_req, n = admitted
            reserved += self._future_need(req)
            if self.use_cache:
                computing.append(req.fill_ids())
            new_reqs.append(new_req)
            entries.append((req, n))
            budget -= n
        return entries, new_reqs

    def _shares_uncached_prefix(self, req: Req, computing: list[np.ndarray]) -> bool:
        """Whether `req` and a prompt being computed share DEFER_MIN_SHARED tokens past req's cached prefix."""
        key = self._match_key(req)
        end = self.cache.peek_prefix_len(key) + DEFER_MIN_SHARED
        head = key[:end]
        return len(head) == end and any(len(other) >= end and np.array_equal(other[:end], head) for other in computing)

    def _admit(self, req: Req, budget: int, reserved: int) -> tuple[NewReq, int] | None:
        """Move `req` from waiting to running if its KV fits beside what running requests still need
        (`reserved`), holding its cached prefix."""
        if self.use_cache:
            match = self.cache.match_prefix(self._match_key(req))
            prefix = match.slots
            self.cache.lock(match.node)
        else:
            match, prefix = None, np.zeros(0, dtype=np.int32)
        n = min(req.fill_len - len(prefix), budget)
        need = req.fill_len - len(prefix) + math.ceil(req.remaining_new_tokens * self.args.new_token_ratio)
        available = self._available() - reserved
        if need > available and (self.running or n > self._available()):
            if match is not None:
                self.cache.unlock(match.node)
            return None
        req.req_slot = self.free_req_slots.pop()
        req.prefix_node = match.node if match is not None else None
        req.prefix_len = req.cached_len = len(prefix)
        if not req.output_ids:
            req.cached_tokens = len(prefix)
            self.stats["prompt_tokens"] += len(req.prompt_ids)
            self.stats["cached_tokens"] += len(prefix)
        self.req_to_token[req.req_slot, :len(prefix)] = prefix
        self.waiting.remove(req)
        self.running.append(req)
        req.stage = Stage.PREFILL
        if not self._assign_slots(req, n):
            raise AssertionError("admission checked the KV that this chunk needs")
        sp = req.sampling
        wants_lp = req.wants_input_logprobs and not req.input_logprobs
        return NewReq(req_slot=req.req_slot, prefix_slots=prefix.tobytes(), temperature=sp.temperature,
                      top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p, seed=req.seed,
                      min_new_tokens=sp.min_new_tokens, stop_ids=i32(sorted(req.stop_ids)),
                      logprob=req.logprob,
                      prompt_ids=req.prompt_ids.tobytes() if wants_lp else None), n

    def _assign_slots(self, req: Req, n: int) -> bool:
        slots = self._alloc(n)
        if slots is None:
            return False
        self.req_to_token[req.req_slot, req.cached_len:req.cached_len + n] = slots
        return True

    def _schedule_decode(self) -> list[tuple[Req, int]]:
        decoding = [r for r in self.running if r.stage == Stage.DECODE]
        while decoding and self._available() < len(decoding):
            victim = decoding.pop()  # the most recently admitted gives way
            if len(self.running) == 1:
                # Alone and still out of KV: it can never grow, so it ends here.
                victim.finish = FinishReason(type="length", length=len(victim.output_ids))
                self.pending_outs.append((victim.reply_to, self._out(victim, [])))
                self._finish(victim)
            else:
                self._retract(victim)
        # Requests that share a cached prefix share its KV slots, token 0's included: side by side in the batch,
        # the attention kernel reads that KV for them at about the same time, and mostly from L2.
        decoding.sort(key=lambda r: self.req_to_token[r.req_slot, 0])
        slots = self._alloc(len(decoding))
        if slots is None:
            raise AssertionError("decode checked that one slot per request is available")
        self.req_to_token[[r.req_slot for r in decoding], [r.cached_len for r in decoding]] = slots
        return [(req, 1) for req in decoding]

    def _retract(self, req: Req) -> None:
        """Out of KV: put a running request back in the queue; what it computed stays cached."""
        log.warning("KV cache full: retracting request %s (%d tokens)", req.rid, req.fill_len)
        self._release(req)
        req.stage = Stage.WAITING
        self.waiting.appendleft(req)
        self.stats["retracted_requests"] += 1

    # ------------------------------------------------------------ results

    def process_result(self, result: StepResult) -> list[Routed]:
        assert result.step == self.step_id, "worker answered a different step"
        self.stats["forward_steps"] += 1
        next_ids = np.frombuffer(result.next_ids, dtype=np.int32)
        next_lps = np.frombuffer(result.next_logprobs, dtype=np.float32)
        outs = []
        for i, (req, n) in enumerate(self.inflight):
            req.cached_len += n
            if self.use_cache and req.stage == Stage.PREFILL:
                self._cache_computed(req)
            if i in result.input_logprobs:
                if not req.input_logprobs and req.logprob.logprob_start_len == 0:
                    req.input_logprobs.append(None)
                    req.input_top_logprobs.append(None)
                req.input_logprobs.extend(result.input_logprobs[i])
                req.input_top_logprobs.extend(result.input_top_logprobs.get(i, [None] * len(result.input_logprobs[i])))
            if req.cached_len < req.fill_len:
                continue  # a chunk of a longer prefill: its sample is not used
            first = req.stage == Stage.PREFILL and not req.output_ids
            req.stage = Stage.DECODE
            new_ids: list[int] = []
            if req.remaining_new_tokens > 0:
                token = int(next_ids[i])
                req.output_ids.append(token)
                new_ids.append(token)
                self.stats["generated_tokens"] += 1
            req.finish = self._check_finish(req)
            out = self._out(req, new_ids, first=first)
            if req.logprob is not None and new_ids:
                out.output_logprobs = [float(next_lps[i])]
                if i in result.top_logprobs:
                    out.output_top_logprobs = [result.top_logprobs[i]]
            if req.finish is not None:
                self._finish(req)
            outs.append((req.reply_to, out))
        self.inflight = []
        return outs

    def _cache_computed(self, req: Req) -> None:
        """Hand the prompt KV computed so far to the tree now (not at finish), so that requests
        admitted meanwhile share it; the request keeps it locked."""
        key = req.token_slice(0, req.cached_len)
        if self.cache.peek_prefix_len(key) != req.prefix_len:
            return  # another request cached part of it meanwhile: ours is freed as duplicates at release
        self.cache.insert(key, self.req_to_token[req.req_slot, :req.cached_len])
        node = self.cache.match_prefix(key).node
        self.cache.lock(node)
        self.cache.unlock(req.prefix_node)
        req.prefix_node, req.prefix_len = node, req.cached_len

    def _check_finish(self, req: Req) -> FinishReason | None:
        sp = req.sampling
        if req.output_ids and len(req.output_ids) >= sp.min_new_tokens and req.output_ids[-1] in req.stop_ids:
            return FinishReason(type="stop", matched=req.output_ids[-1])
        if len(req.output_ids) >= sp.max_new_tokens:
            return FinishReason(type="length", length=sp.max_new_tokens)
        if req.fill_len >= self.context_length:
            return FinishReason(type="length", length=len(req.output_ids))
        return None

    def _out(self, req: Req, new_ids: list[int], first: bool = False) -> ReqOut:
        out = ReqOut(rid=req.rid, new_ids=new_ids, prompt_tokens=len(req.prompt_ids),
                     cached_tokens=req.cached_tokens, completion_tokens=len(req.output_ids), finish=req.finish)
        if first and req.input_logprobs:
            out.input_logprobs = req.input_logprobs
            out.input_top_logprobs = req.input_top_logprobs
            out.input_ids = req.prompt_ids.tolist()
        return out

    def _finish(self, req: Req) -> None:
        self._release(req)
        self._end_session_turn(req)
        req.stage = Stage.FINISHED
        self.stats["finished_requests"] += 1
        del self.reqs[req.rid]

    def _truncate_output(self, req: Req, kept: int) -> None:
        """Drop output past `kept` tokens (a stop string matched earlier); free the KV of what is dropped."""
        if kept >= len(req.output_ids):
            return
        del req.output_ids[kept:]
        valid = min(req.cached_len, req.fill_len)
        # Tokens past the prompt were never handed to the tree, so slots [valid, cached_len) are the request's own.
        assert valid >= req.prefix_len
        self.allocator.free(self.req_to_token[req.req_slot, valid:req.cached_len].copy())
        req.cached_len = valid

    def _end_session_turn(self, req: Req) -> None:
        """A session turn that ended normally keeps its computed context pinned in the cache."""
        if req.session_id is None:
            return
        if req.finish.type == "abort":
            self.sessions.end_turn(req.rid, None, None)
        else:
            self.sessions.end_turn(req.rid, req.output_ids, req.fill_ids()[:req.fill_len - 1])

    def _release(self, req: Req) -> None:
        """Give back the req slot; computed KV goes into the tree (or is freed without a cache)."""
        slots = self.req_to_token[req.req_slot, :req.cached_len].copy()
        if self.use_cache:
            already = self.cache.insert(req.fill_ids()[:req.cached_len], slots)
            # The tree now owns slots[already:]; slots[prefix_len:already] duplicate its own.
            self.allocator.free(slots[req.prefix_len:already])
            self.cache.unlock(req.prefix_node)
        else:
            self.allocator.free(slots[req.prefix_len:])
        self.running.remove(req)
        self.free_req_slots.append(req.req_slot)
        req.req_slot, req.cached_len, req.prefix_len, req.prefix_node = -1, 0, 0, None

    # ------------------------------------------------------------ introspection

    def flush_cache(self) -> bool:
        if self.running:
            return False
        self.sessions.unpin_all()
        self.cache.reset()
        return True

    def check_invariants(self) -> None:
        """Every KV slot is exactly one of: free, in the tree (evictable or locked), owned by a running request."""
        free = self.allocator.free_slots()
        cached = self.cache.check_invariants()
        owned = [self.req_to_token[r.req_slot, r.prefix_len:r.cached_len] for r in self.running]
        # Slots assigned for an in-flight step are owned too; between steps there are none.
        assert not self.inflight, "check_invariants runs between steps"
        parts = np.concatenate([free, cached, *owned]) if owned else np.concatenate([free, cached])
        assert len(parts) == self.allocator.capacity, (
            f"slots: {len(free)} free + {len(cached)} cached + {sum(map(len, owned))} owned != {self.allocator.capacity}")
        assert len(np.unique(parts)) == len(parts), "a KV slot is counted twice"
        assert 0 not in parts, "the padding slot was handed out"
        for r in self.running:
            assert (self.req_to_token[r.req_slot, :r.prefix_len] != 0).all() or r.prefix_len == 0
        assert len(self.free_req_slots) + len(self.running) == self.args.max_running_requests

    def info(self) -> dict:
        cap = self.allocator.capacity
        used = cap - self.allocator.num_free - self.cache.evictable_size
        return {"num_running_reqs": len(self.running), "num_waiting_reqs": len(self.waiting),
                "max_total_num_tokens": cap, "kv_free_tokens": self.allocator.num_free,
                "kv_cached_tokens": self.cache.total_size, "kv_evictable_tokens": self.cache.evictable_size,
                "token_usage": round(used / cap, 4), **self.sessions.info(), **self.stats}

