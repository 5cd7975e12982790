"""Decode steps: one new token for every running request that has its whole prompt, and retraction when KV
runs out.

Retraction: while fewer KV slots can be had than requests decoding, the most recently admitted gives way
and goes back to the front of the waiting queue (Lifecycle.retract); what it computed goes into the tree, so
re-admission recomputes little. A request alone that still cannot grow is handed back to end with `length`.
Order: requests that share token 0's KV slot (so a cached prefix) sit side by side in the batch, so the
attention kernel reads that KV for them at about the same time, and mostly from L2 (and prefix_groups.py
can group them).
"""

from __future__ import annotations

import logging

import numpy as np

from scheduler_proc.block_table import BlockTable
from scheduler_proc.lifecycle import Lifecycle
from scheduler_proc.queues import RunningSet
from scheduler_proc.request import Req, Stage
from scheduler_proc.speculative import Speculator

log = logging.getLogger("radixserve.scheduler")


class DecodePlanner:
    """Picks a decode step's batch, retracting requests while KV is short."""

    def __init__(self, table: BlockTable, running: RunningSet, lifecycle: Lifecycle,
                 spec: Speculator | None = None) -> None:
        self.table = table
        self.spec = spec
        self.running = running
        self.lifecycle = lifecycle

    def plan(self) -> tuple[list[Req], Req | None]:
        """The batch in decode order, each with a KV slot for its new token; and a request that can never grow
        (alone and out of KV), for the caller to end, or None."""
        # A request whose last token is still in flight (overlap scheduling) has nothing left to decode.
        # Nor one whose verify step is in flight (its accepted count decides where it goes on): speculative.py.
        decoding = [r for r in self.running if r.stage == Stage.DECODE and r.remaining_new_tokens > 0
                    and not r.verifying]
        if self.spec is not None:
            decoding = self.spec.hold(decoding)
        while decoding and self.table.available() < len(decoding):
            victim = decoding.pop()  # the most recently admitted gives way
            if len(self.running) == 1:
                return [], victim
            log.warning("KV cache full: retracting request %s (%d tokens)", victim.rid, victim.fill_len)
            self.lifecycle.retract(victim)
        if not decoding:
            return [], None
        rows = np.fromiter((r.req_slot for r in decoding), dtype=np.int32, count=len(decoding))
        columns = np.fromiter((r.cached_len for r in decoding), dtype=np.int32, count=len(decoding))
        order = np.argsort(self.table.req_to_token[rows, 0], kind="stable")
        self.table.assign_decode(rows[order], columns[order])
        return [decoding[i] for i in order.tolist()], None
