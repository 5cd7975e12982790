"""Control-plane calls, answered by the scheduler between steps."""

from __future__ import annotations

from radixserve import wire
from scheduler_proc.scheduler import Scheduler
from scheduler_proc.sessions import SessionError


def handle_control(sched: Scheduler, runtime: wire.RuntimeInfo, msg: wire.ControlCall) -> wire.ControlReply:
    """The reply to one call; O(1) except CheckInvariants, which walks the whole KV and cache state."""
    if isinstance(msg, wire.GetServerInfo):
        status = wire.ServerStatus(sched.info(), runtime, sched.maybe_check_invariants())
        return wire.ControlReply(msg.call_id, result=status)
    if isinstance(msg, wire.CheckInvariants):
        try:
            sched.check_invariants()
        except AssertionError as e:
            return wire.ControlReply(msg.call_id, status=500, error=str(e),
                                     result=wire.ServerStatus(sched.info(), runtime, f"violated: {e}"))
        return wire.ControlReply(msg.call_id, result=wire.ServerStatus(sched.info(), runtime, "ok"))
    if isinstance(msg, wire.FlushCache):
        if sched.flush_cache():
            return wire.ControlReply(msg.call_id)
        return wire.ControlReply(msg.call_id, status=400, error="cannot flush the cache while requests are running")
    try:
        if isinstance(msg, wire.OpenSession):
            sid = sched.sessions.open(msg.session_id, msg.capacity_of_str_len, msg.idle_timeout)
            return wire.ControlReply(msg.call_id, result=wire.SessionOpened(sid))
        sched.sessions.close(msg.session_id)
        return wire.ControlReply(msg.call_id)
    except SessionError as e:
        return wire.ControlReply(msg.call_id, status=e.status, error=str(e))
