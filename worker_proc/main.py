"""A tensor-parallel worker process: run every StepBatch the scheduler sends; rank 0 answers."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback

import msgspec
import torch
import zmq

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.ipc import IpcPaths, Sender
from radixserve.nodes import NodeLayout
from radixserve.procutil import child_init, keep_freed_memory
from worker_proc import parallel
from worker_proc.step_io import PendingStep

log = logging.getLogger("radixserve.worker")
ERROR_LINGER_MS = 2000
ERROR_EXIT_DELAY_S = 2.0


class ResultSender:
    """Rank 0's results leave from a thread of their own, which owns the out socket once the worker is ready:
    it waits for each step's device-to-host copy while the main thread launches the next step.
    Invariant: results leave in step order (one queue, one thread)."""

    def __init__(self, out: Sender) -> None:
        self.out = out
        self.queue: queue.SimpleQueue[PendingStep | wire.WorkerError | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="results", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if isinstance(item, wire.WorkerError):
                self.out.send(item)
                return
            try:
                result = item.result()
            except Exception as e:  # a device fault surfaces at the sync: report it as the step's failure
                log.error("worker 0 failed:\n%s", traceback.format_exc())
                self.out.send(wire.WorkerError(rank=0, message=f"{type(e).__name__}: {e}"))
                _linger_and_exit(self.out.sock.context)
            self.out.send(result)

    def close(self, error: wire.WorkerError | None = None) -> None:
        """Send what is queued (and `error`, last), then stop the thread."""
        self.queue.put(error)
        self.thread.join(timeout=ERROR_LINGER_MS / 1000)


def _linger_and_exit(ctx: zmq.Context) -> None:
    # Deliver the error (the sockets do not linger), and let it reach the client before the supervisor
    # sees a dead worker: every rank waits, since any child's exit stops the server with a bare exit code.
    ctx.destroy(linger=ERROR_LINGER_MS)
    time.sleep(ERROR_EXIT_DELAY_S)
    os._exit(1)


def run_worker(args_json: bytes, ipc_root: str, rank: int, model_dir: str, parent_pid: int) -> None:
    args = msgspec.json.decode(args_json, type=ServerArgs)
    child_init(f"worker-{rank}", parent_pid, args.log_level)
    ipc = IpcPaths(ipc_root)
    ctx = zmq.Context()
    nodes = NodeLayout.of(args)
    inbox = nodes.step_receiver(ctx, ipc, rank)
    out = Sender(ctx, ipc.worker_out) if rank == 0 else None
    sender: ResultSender | None = None
    try:
        from worker_proc.model_runner import ModelRunner
        from worker_proc.runtime_facts import resolve_device
        from worker_proc.warmup import warm_up

        device = resolve_device(args, rank)
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // nodes.ranks_per_node))
            keep_freed_memory()
            waits = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
            log.info("rank %d: %d threads, OpenMP waits: %s", rank, torch.get_num_threads(),
                     " ".join(waits) or "libgomp's default")
        else:
            torch.cuda.set_device(device)
        parallel.init_tp(rank, args.tp_size, nodes.tp_init_method(ipc), "nccl" if device.type == "cuda" else "gloo",
                         args.ep_size)
        runner = ModelRunner(args, rank, model_dir)
        warm_up(runner)  # every rank: its steps meet the other ranks' collectives; ready means ready
        if out is not None:
            out.send(wire.WorkerReady(runner.runtime_info()))
            sender = ResultSender(out)
        while True:
            msg = inbox.recv()
            if isinstance(msg, wire.Shutdown):
                break
            pending = runner.launch(msg)
            if sender is not None:
                sender.queue.put(pending)
    except Exception as e:
        log.error("worker %d failed:\n%s", rank, traceback.format_exc())
        error = wire.WorkerError(rank=rank, message=f"{type(e).__name__}: {e}")
        if sender is not None:
            sender.close(error)
        elif out is not None:
            out.send(error)
        _linger_and_exit(ctx)
    if sender is not None:
        sender.close()
    os._exit(0)
