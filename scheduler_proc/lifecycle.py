"""A request's way through the scheduler, and the one path by which it ends.

Arrival (`begin`): the request is registered by rid and held for its grammar (grammar_gate.py, Stage.HELD) or
queued (WAITING). Prefill admits it (prefill.py: WAITING -> PREFILL, with a block-table row); the step that
computes its last prompt token makes it DECODE; decode may retract it (`retract`: back to WAITING, its computed
KV left in the tree) — not an end: it keeps its rid, its session turn and its output.

Every way of ending goes through `end`, called by scheduler.py only: a finish a step found (a stop id,
max_new_tokens, the context: `process_result`), a stop string the tokenizer matched and an abort (the client's,
a disconnect: both an `Abort`, `abort`), a grammar that does not compile and a request the workers could not
admit (both rejected with a 400: `process_result`), a request alone and out of KV (`length`: `schedule`), the
server shutting down (`shutdown`). Closing a session ends none of its turns: it drops the session's pin, and a
turn still running ends later by this path, pinning nothing (sessions.py).

Invariant (one path): a request is in `reqs` from `begin` to its `end`, and meanwhile in exactly one place, which
its stage names: the grammar gate (HELD), the waiting queue (WAITING) or the running set (PREFILL, DECODE: a row,
the KV it computed, a lock on its cached prefix). `end` runs once per request — a second end is an
AssertionError — and frees each thing the request holds once: its tokens still in flight, its place (a running
request through `release`, the same release retraction uses: row back, computed KV into the tree, prefix
unlocked), its session turn; then it counts the end (finished or aborted; a rejection, as one on arrival, counts
in neither) and emits the request's one final message. Nothing else removes a request from `reqs` or frees its
row (Scheduler.check_invariants: the KV partition of block_table.py, and `check_invariants` here).
"""

from __future__ import annotations

import dataclasses

from radixserve.wire import ControlReply, FinishReason, Rejected, ReqOut, StepBatch
from scheduler_proc.block_table import BlockTable
from scheduler_proc.counters import Counters
from scheduler_proc.grammar_gate import GrammarGate
from scheduler_proc.outputs import final_report, make_out
from scheduler_proc.queues import RunningSet, WaitingQueue
from scheduler_proc.request import Req, Stage
from scheduler_proc.sessions import SessionTable

Routed = tuple[int, ReqOut]  # (front end, output)


@dataclasses.dataclass(slots=True)
class Outcome:
    """What one scheduler call produced, for scheduler_proc/main.py to send at once (the scheduler keeps nothing
    to send later): a step for every worker, token messages (one TokenBatch per front end), and rejections and
    control replies (one message each), each with the front end it goes to."""

    batch: StepBatch | None = None
    outs: list[Routed] = dataclasses.field(default_factory=list)
    replies: list[tuple[int, Rejected | ControlReply]] = dataclasses.field(default_factory=list)


class Lifecycle:
    """The requests by rid, their moves between places that are not admission, and their one end."""

    def __init__(self, table: BlockTable, running: RunningSet, waiting: WaitingQueue, grammars: GrammarGate,
                 sessions: SessionTable, counters: Counters) -> None:
        self.table = table
        self.running = running
        self.waiting = waiting
        self.grammars = grammars
        self.sessions = sessions
        self.counters = counters
        self.reqs: dict[str, Req] = {}  # every request held, waiting or running, by rid

    def begin(self, req: Req) -> None:
        """A new request: held until its grammar is compiled, else queued."""
        assert req.rid not in self.reqs, f"request id {req.rid!r} is in use"
        self.reqs[req.rid] = req
        if not self.grammars.hold(req):
            self.waiting.push_back(req)

    def retract(self, req: Req) -> None:
        """Out of KV: a running request goes back to the front of the queue; what it computed stays cached."""
        self.release(req)
        self.waiting.push_front(req)
        self.counters.retracted_requests += 1

    def release(self, req: Req) -> None:
        """A running request leaves the running set: its row goes back, its computed KV into the tree (or is
        freed without a cache), its prefix is unlocked."""
        self.running.remove(req)
        self.table.release(req)

    def end(self, req: Req, finish: FinishReason, outcome: Outcome, last: ReqOut | None = None,
            status: int | None = None) -> None:
        """End `req` as `finish` says, wherever it is (see the invariant above). Its final message goes to
        `outcome`: `last` (a step's output that carries `finish`), else one with no new tokens; with `status`, a
        Rejected with the finish's message instead. Output past `finish.length` is dropped (a stop string), and
        the outputs not sent yet go with the final message."""
        assert req.stage != Stage.FINISHED, f"request {req.rid} ended twice"
        assert self.reqs.pop(req.rid) is req, f"request {req.rid} is not the one registered under its rid"
        req.drop_pending()  # sampled by a step in flight: past the finish, never reported
        kept = len(req.output_ids) if finish.length is None else min(finish.length, len(req.output_ids))
        if req.stage == Stage.HELD:
            self.grammars.drop(req)
        elif req.stage == Stage.WAITING:
            self.waiting.remove(req)
            del req.output_ids[kept:]  # retracted: its KV is in the tree already, none of it the request's own
        else:
            self.table.trim(req, kept)
            self.release(req)
        req.finish, req.stage = finish, Stage.FINISHED
        self._end_session_turn(req)
        if status is not None:  # counted nowhere, as a request rejected on arrival
            outcome.replies.append((req.reply_to, Rejected(req.rid, status, finish.message)))
            return
        if finish.type == "abort":
            self.counters.aborted_requests += 1
        else:
            self.counters.finished_requests += 1
        last = last if last is not None else make_out(req, [], finish)
        outcome.outs.append((req.reply_to, final_report(req, last)))

    def _end_session_turn(self, req: Req) -> None:
        """A session turn that ended normally keeps its computed context pinned in the cache (after `release`
        put that context in the tree); an aborted one is forgotten."""
        if req.session_id is None:
            return
        if req.finish.type == "abort":
            self.sessions.end_turn(req.rid, None, None)
        else:
            self.sessions.end_turn(req.rid, req.output_ids, req.fill_ids()[:req.fill_len - 1])

    def check_invariants(self) -> None:
        """Every request by rid is in exactly the place its stage names (O(requests): between steps)."""
        places = {Stage.HELD: list(self.grammars), Stage.WAITING: list(self.waiting), Stage.PREFILL: [],
                  Stage.DECODE: []}
        for req in self.running:
            places[req.stage].append(req)
        placed = [req for reqs in places.values() for req in reqs]
        assert len(placed) == len(self.reqs) and all(self.reqs.get(r.rid) is r for r in placed), (
            "requests by rid disagree with the queues")
        assert all(r.stage == stage for stage, reqs in places.items() for r in reqs), "a request's stage is stale"
