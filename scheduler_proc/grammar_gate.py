"""Requests with a grammar wait here until worker 0 has compiled it, so compiling never stalls a step.

A grammar the scheduler has not seen compiled gets a compile job (sent with the next StepBatch, or with a step
of no requests when nothing else runs); its requests are held until a StepResult reports the job done, then
queued in arrival order, or rejected with xgrammar's error (a 400: the scheduler ends them, and each end lets go
of its request here, `drop`). Grammars reported compiled (or invalid) are
remembered, bounded (LRU), so their next requests go straight to the queue (or are rejected at once). The
worker's own cache may have dropped a grammar remembered here: it is then compiled again at admission.
"""

from __future__ import annotations

from collections import OrderedDict

from radixserve.wire import CompileGrammar, Grammar, GrammarDone
from scheduler_proc.request import Req, Stage

REMEMBERED = 1024  # grammars remembered as compiled or invalid


class GrammarGate:
    """Held requests by compile job, and what is known of grammars."""

    def __init__(self) -> None:
        self._known: OrderedDict[Grammar, str | None] = OrderedDict()  # grammar -> None (compiled) or its error
        self._jobs: dict[int, tuple[Grammar, list[Req]]] = {}  # gid -> (grammar, requests held for it)
        self._gid_of: dict[Grammar, int] = {}
        self._rejected: dict[Req, None] = {}  # held for a grammar found invalid, until each is ended (`drop`)
        self._to_send: list[CompileGrammar] = []
        self._next_gid = 0

    def __len__(self) -> int:
        """Requests held."""
        return sum(len(reqs) for _, reqs in self._jobs.values()) + len(self._rejected)

    def __iter__(self):
        yield from (req for _, reqs in self._jobs.values() for req in reqs)
        yield from self._rejected

    @property
    def busy(self) -> bool:
        """Compile jobs to send or to hear back from."""
        return bool(self._jobs)

    def error(self, grammar: Grammar) -> str | None:
        """The error of a grammar known to be invalid."""
        return self._known.get(grammar)

    def hold(self, req: Req) -> bool:
        """Hold `req` until its grammar is compiled (Stage.HELD); False if it may be queued now (no grammar, or
        compiled)."""
        grammar = req.grammar
        if grammar is None or (grammar in self._known and self._known[grammar] is None):
            if grammar is not None:
                self._known.move_to_end(grammar)
            return False
        gid = self._gid_of.get(grammar)
        if gid is None:
            gid = self._gid_of[grammar] = self._next_gid
            self._next_gid += 1
            self._jobs[gid] = (grammar, [])
            self._to_send.append(CompileGrammar(gid, grammar))
        self._jobs[gid][1].append(req)
        req.stage = Stage.HELD
        return True

    def drop(self, req: Req) -> None:
        """Let go of a held request that ended (lifecycle.py); ValueError or KeyError if it is not held."""
        if req in self._rejected:
            del self._rejected[req]
        else:
            self._jobs[self._gid_of[req.grammar]][1].remove(req)

    def take_jobs(self) -> list[CompileGrammar]:
        jobs, self._to_send = self._to_send, []
        return jobs

    def done(self, results: list[GrammarDone]) -> tuple[list[Req], list[tuple[Req, str]]]:
        """Compile results in: (requests to queue, (request, error) to reject), in arrival order. The first have
        left the gate; the second are still held, each until it is ended."""
        ready: list[Req] = []
        rejected: list[tuple[Req, str]] = []
        for result in results:
            grammar, reqs = self._jobs.pop(result.gid)
            del self._gid_of[grammar]
            self._known[grammar] = result.error
            if len(self._known) > REMEMBERED:
                self._known.popitem(last=False)
            if result.error is None:
                ready += reqs
            else:
                rejected += [(req, result.error) for req in reqs]
                self._rejected.update(dict.fromkeys(reqs))
        ready.sort(key=lambda r: r.arrival)
        return ready, rejected
