"""Control-plane calls answered by the scheduler between steps."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from radixserve import wire
from scheduler_proc.sessions import SessionError

if TYPE_CHECKING:
    from scheduler_proc.main import SchedulerProcess


def handle_control(proc: SchedulerProcess, msg: wire.Control) -> wire.ControlReply:
    sched = proc.sched
    if msg.op == "server_info":
        try:
            sched.check_invariants()
            invariants = "ok"
        except AssertionError as e:
            invariants = f"violated: {e}"
        return wire.ControlReply(call_id=msg.call_id, ok=True, result={
            "server_args": dataclasses.asdict(proc.args), "worker": proc.worker_info,
            "scheduler": {**sched.info(), "invariants": invariants}})
    if msg.op == "flush_cache":
        flushed = sched.flush_cache()
        return wire.ControlReply(call_id=msg.call_id, ok=flushed, status=200 if flushed else 400,
                                 error=None if flushed else "cannot flush the cache while requests are running")
    if msg.op == "check_invariants":
        try:
            sched.check_invariants()
        except AssertionError as e:
            return wire.ControlReply(call_id=msg.call_id, ok=False, error=str(e), status=500, result=sched.info())
        return wire.ControlReply(call_id=msg.call_id, ok=True, result=sched.info())
    if msg.op in ("open_session", "close_session"):
        try:
            if msg.op == "open_session":
                sid = sched.sessions.open(msg.args.get("session_id"), int(msg.args.get("capacity_of_str_len", 0)),
                                          msg.args.get("timeout"))
                return wire.ControlReply(call_id=msg.call_id, ok=True, result={"session_id": sid})
            sched.sessions.close(str(msg.args.get("session_id")))
            return wire.ControlReply(call_id=msg.call_id, ok=True)
        except SessionError as e:
            return wire.ControlReply(call_id=msg.call_id, ok=False, status=e.status, error=str(e))
    return wire.ControlReply(call_id=msg.call_id, ok=False, status=400, error=f"unknown control op {msg.op!r}")
