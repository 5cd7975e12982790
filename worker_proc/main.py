"""A tensor-parallel worker process: run every StepBatch the scheduler sends; rank 0 answers."""

from __future__ import annotations

import logging
import os
import time
import traceback

import msgspec
import torch
import zmq

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.ipc import IpcPaths, Receiver, Sender
from radixserve.procutil import child_init
from worker_proc import parallel

log = logging.getLogger("radixserve.worker")
ERROR_LINGER_MS = 2000
ERROR_EXIT_DELAY_S = 2.0


def run_worker(args_json: bytes, ipc_root: str, rank: int, model_dir: str, parent_pid: int) -> None:
    args = msgspec.json.decode(args_json, type=ServerArgs)
    child_init(f"worker-{rank}", parent_pid, args.log_level)
    ipc = IpcPaths(ipc_root)
    ctx = zmq.Context()
    inbox = Receiver(ctx, ipc.worker_in(rank), wire.WorkerIn)
    out = Sender(ctx, ipc.worker_out) if rank == 0 else None
    try:
        from worker_proc.model_runner import ModelRunner, resolve_device

        device = resolve_device(args, rank)
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp_size))
        else:
            torch.cuda.set_device(device)
        parallel.init_tp(rank, args.tp_size, ipc.tp_init_method, "nccl" if device.type == "cuda" else "gloo")
        runner = ModelRunner(args, rank, model_dir)
        if out is not None:
            gpu_used = gpu_free = 0
            if device.type == "cuda":
                gpu_free, total = torch.cuda.mem_get_info(device)
                gpu_used = total - gpu_free
            out.send(wire.WorkerReady(wire.RuntimeInfo(
                num_kv_slots=runner.num_kv_slots, context_length=runner.context_length,
                vocab_size=runner.model.vocab_size, device=str(device), dtype=str(runner.dtype).removeprefix("torch."),
                attention_backend=runner.backend_name, kv_bytes_per_token=runner.kv_bytes_per_token * args.tp_size,
                weight_bytes=runner.weight_bytes * args.tp_size, gpu_memory_used=gpu_used, gpu_memory_free=gpu_free,
                cascade_attention=runner.use_cascade)))
        while True:
            msg = inbox.recv()
            if isinstance(msg, wire.Shutdown):
                break
            result = runner.step(msg)
            if out is not None:
                out.send(result)
    except Exception as e:
        log.error("worker %d failed:\n%s", rank, traceback.format_exc())
        if out is not None:
            out.send(wire.WorkerError(rank=rank, message=f"{type(e).__name__}: {e}"))
        # Deliver the error (the sockets do not linger), and let it reach the client before the supervisor
        # sees a dead worker: every rank waits, since any child's exit stops the server with a bare exit code.
        ctx.destroy(linger=ERROR_LINGER_MS)
        time.sleep(ERROR_EXIT_DELAY_S)
        os._exit(1)
    os._exit(0)
