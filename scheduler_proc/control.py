"""Control-plane calls, answered by the scheduler between steps."""

from __future__ import annotations

from radixserve import wire
from scheduler_proc.lifecycle import Outcome
from scheduler_proc.scheduler import Scheduler
from scheduler_proc.sessions import SessionError


def handle_control(sched: Scheduler, runtime: wire.RuntimeInfo, msg: wire.ControlCall) -> Outcome:
    """The reply to one call, to the front end that made it; O(1) except CheckInvariants, which walks the whole
    KV and cache state. None of them ends a request (closing a session drops its pin only: lifecycle.py)."""
    reply = _reply(sched, runtime, msg)
    return Outcome(replies=[(msg.reply_to, reply)])


def _reply(sched: Scheduler, runtime: wire.RuntimeInfo, msg: wire.ControlCall) -> wire.ControlReply:
    """One case per call of wire.ControlCall; any other message is a TypeError (a call added to the wire without
    its case here), not a fallthrough to some other call."""
    match msg:
        case wire.GetServerInfo():
            status = wire.ServerStatus(sched.info(), runtime, sched.maybe_check_invariants())
            return wire.ControlReply(msg.call_id, result=status)
        case wire.CheckInvariants():
            try:
                sched.check_invariants()
            except AssertionError as e:
                return wire.ControlReply(msg.call_id, status=500, error=str(e),
                                         result=wire.ServerStatus(sched.info(), runtime, f"violated: {e}"))
            return wire.ControlReply(msg.call_id, result=wire.ServerStatus(sched.info(), runtime, "ok"))
        case wire.FlushCache():
            if sched.flush_cache():
                return wire.ControlReply(msg.call_id)
            return wire.ControlReply(msg.call_id, status=400,
                                     error="cannot flush the cache while requests are running")
        case wire.OpenSession():
            try:
                sid = sched.sessions.open(msg.session_id, msg.capacity_of_str_len, msg.idle_timeout)
            except SessionError as e:
                return wire.ControlReply(msg.call_id, status=e.status, error=str(e))
            return wire.ControlReply(msg.call_id, result=wire.SessionOpened(sid))
        case wire.CloseSession():
            try:
                sched.sessions.close(msg.session_id)
            except SessionError as e:
                return wire.ControlReply(msg.call_id, status=e.status, error=str(e))
            return wire.ControlReply(msg.call_id)
    raise TypeError(f"no handler for control call {type(msg).__name__}")
