"""The scheduler process: receive requests, run steps on the workers, send tokens back."""

from __future__ import annotations

import logging
import os
import sys
import time

import msgspec
import zmq

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.ipc import IpcPaths, Receiver, Sender, Undecodable
from radixserve.kv_events import KVEventsConfig
from radixserve.nodes import NodeLayout
from radixserve.procutil import child_init
from scheduler_proc.control import handle_control
from scheduler_proc.kv_publisher import KVEventPublisher
from scheduler_proc.lifecycle import Outcome
from scheduler_proc.scheduler import Scheduler

log = logging.getLogger("radixserve.scheduler")


class SchedulerProcess:
    def __init__(self, args: ServerArgs, ipc: IpcPaths, num_replies: int) -> None:
        self.args = args
        ctx = zmq.Context()
        self.inbox = Receiver(ctx, ipc.scheduler_in, wire.SchedulerIn)
        self.worker_out = Receiver(ctx, ipc.worker_out, wire.WorkerOut)
        nodes = NodeLayout.of(args)
        self.workers = [nodes.step_sender(ctx, ipc, r) for r in range(args.tp_size)]
        self.replies = [Sender(ctx, ipc.scheduler_out(i)) for i in range(num_replies)]
        self.runtime = self._wait_worker_ready()
        rt = self.runtime
        self.sched = Scheduler(args, rt.num_kv_slots, rt.context_length, rt.vocab_size,
                               cascade_attention=rt.cascade_attention, num_host_kv_slots=rt.num_host_kv_slots,
                               device=rt.device)
        # The scheduler owns the radix cache, so it publishes the cache's events: after every call that changed it.
        self.kv_events = (KVEventPublisher(KVEventsConfig.parse(args.kv_events_config))
                          if self.sched.cache.events is not None else None)
        log.info("scheduler ready: %d KV slots, context %d", rt.num_kv_slots - 1, rt.context_length)
        for r in self.replies:
            r.send(wire.Ready(runtime=rt))

    def _wait_worker_ready(self) -> wire.RuntimeInfo:
        msg = self.worker_out.recv()
        if isinstance(msg, wire.WorkerError):
            log.error("worker %d failed to start: %s", msg.rank, msg.message)
            for r in self.replies:
                r.send(wire.Ready(error=f"worker {msg.rank}: {msg.message}"))
            time.sleep(0.5)  # let the error reach the launcher before this process exits
            sys.exit(1)
        assert isinstance(msg, wire.WorkerReady)
        return msg.runtime

    def run(self) -> None:
        """The step loop. With overlap scheduling (the default) step N+1 is built and sent while the workers run
        step N, and N's results are processed after that: the device never waits for this loop."""
        overlap = not self.args.disable_overlap_schedule
        next_expiry = 0.0
        while True:
            now = time.monotonic()
            if now > next_expiry:
                self.sched.sessions.expire(now)
                next_expiry = now + 1.0
            msgs = self.inbox.drain()
            if not msgs and not self.sched.has_work and not self.sched.inflight:
                first = self.inbox.recv(timeout_ms=1000)
                msgs = [first] if first is not None else []
            for msg in msgs:
                if not self._handle(msg):
                    return
            step = self.sched.schedule()
            self._send(step)
            # Without overlap every step is answered before the next is built; with it, one step stays in flight
            # unless there is nothing to send beside it.
            if len(self.sched.inflight) > (1 if overlap and step.batch is not None else 0):
                self._process_oldest()

    def _process_oldest(self) -> None:
        self._send(self.sched.process_result(self._wait_result()))

    def _wait_result(self) -> wire.StepResult:
        deadline = time.monotonic() + self.args.watchdog_timeout
        while True:
            msg = self.worker_out.recv(timeout_ms=1000)
            if isinstance(msg, wire.StepResult):
                return msg
            if isinstance(msg, wire.WorkerError):
                log.error("worker %d failed: %s", msg.rank, msg.message)
                sys.exit(1)
            if time.monotonic() > deadline:
                log.error("a forward step took over %.0f s: the workers are hung", self.args.watchdog_timeout)
                sys.exit(1)

    def _drain_inflight(self) -> None:
        """Answer every step in flight (for a call that needs the state between steps)."""
        while self.sched.inflight:
            self._process_oldest()

    def _handle(self, msg: msgspec.Struct) -> bool:
        """Apply one message from a front end and send what it produced; False once the server is to stop."""
        match msg:
            case Undecodable():  # a request whose values break the wire's bounds: it never reaches the scheduler
                if 0 <= msg.reply_to < len(self.replies):
                    self._send(Outcome(replies=[(msg.reply_to, msg.rejection())]))
            case wire.GenerateTokens():
                self._send(self.sched.submit(msg))
            case wire.Abort():
                self._send(self.sched.abort(msg.rid, msg.finish))
            case wire.ShutdownServer():
                self._send(self.sched.shutdown())
                for w in self.workers:
                    w.send(wire.Shutdown())
                if self.kv_events is not None:
                    self.kv_events.close()
                return False
            case _:  # a control call (control.py: an unknown message is a TypeError there)
                # A call that reads the state between steps waits for the steps in flight: always the invariant
                # walk, and server info when invariant checks are on and no request is left (so an idle server
                # says "ok").
                idle_check = self.args.enable_invariant_checks and not self.sched.has_work
                if isinstance(msg, wire.CheckInvariants) or (isinstance(msg, wire.GetServerInfo) and idle_check):
                    self._drain_inflight()
                self._send(handle_control(self.sched, self.runtime, msg))
        return True

    def _send(self, outcome: Outcome) -> None:
        """Send what a scheduler call produced: the step to every worker first, then one TokenBatch per front
        end, then rejections and control replies."""
        if outcome.batch is not None:
            payload = wire.encoder.encode(outcome.batch)
            for w in self.workers:
                w.send_bytes(payload)
        by_dest: dict[int, list[wire.ReqOut]] = {}
        for dest, out in outcome.outs:
            by_dest.setdefault(dest, []).append(out)
        for dest, group in by_dest.items():
            self.replies[dest].send(wire.TokenBatch(outs=group))
        for dest, reply in outcome.replies:
            self.replies[dest].send(reply)
        if self.kv_events is not None:
            ts, events = self.sched.cache.events.take()
            if events:
                self.kv_events.publish(ts, events)


def run_scheduler(args_json: bytes, ipc_root: str, num_replies: int, parent_pid: int) -> None:
    args = msgspec.json.decode(args_json, type=ServerArgs)
    child_init("scheduler", parent_pid, args.log_level)
    try:
        SchedulerProcess(args, IpcPaths(ipc_root), num_replies).run()
    except Exception:
        log.exception("scheduler crashed")
        os._exit(1)
