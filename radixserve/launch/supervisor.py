"""Start the backend processes (scheduler + TP workers, and tokenizers for a server) and stop them."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from multiprocessing import connection

import msgspec

from radixserve.config import ServerArgs
from radixserve.ipc import IpcPaths
from radixserve.nodes import NodeLayout
from radixserve.procutil import HOST_ONLY_ENV, spawn

log = logging.getLogger("radixserve")
CPU_SPIN_COUNT = "3000"  # libgomp spin iterations before an idle OpenMP thread sleeps (see start_workers)


class ChildDied(RuntimeError):
    pass


class ProcessGroup:
    """Children of this process; any of them dying is fatal for the whole server."""

    def __init__(self) -> None:
        self.procs: list[mp.Process] = []

    def add(self, target, name: str, *args, env: dict[str, str] | None = None) -> None:
        self.procs.append(spawn(target, name, *args, env=env))

    def check(self) -> None:
        """Raise ChildDied if a child has exited."""
        for p in self.procs:
            if p.exitcode is not None:
                raise ChildDied(f"{p.name} (pid {p.pid}) exited with code {p.exitcode}")

    def wait_exited(self, timeout: float) -> bool:
        """Wait until every child has exited (and is reaped), `timeout` seconds at most; True if all did. It
        blocks on the children's sentinels, so it returns as soon as the last one exits."""
        deadline = time.monotonic() + timeout
        while running := [p for p in self.procs if p.exitcode is None]:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            connection.wait([p.sentinel for p in running], left)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every child, SIGKILL what is left after `timeout`; reap all."""
        for p in self.procs:
            if p.exitcode is None:
                p.terminate()
        if not self.wait_exited(timeout):
            for p in self.procs:
                if p.exitcode is None:
                    p.kill()
            self.wait_exited(1.0)
        self.procs.clear()


def start_backend(group: ProcessGroup, args: ServerArgs, ipc: IpcPaths, model_dir: str, num_replies: int) -> None:
    """Spawn the scheduler and one worker per TP rank of this node (all of them on one node)."""
    from scheduler_proc.main import run_scheduler

    group.add(run_scheduler, "scheduler", msgspec.json.encode(args), ipc.root, num_replies, os.getpid(),
              env=HOST_ONLY_ENV)
    start_workers(group, args, ipc, model_dir)


def short_spin_env() -> dict[str, str]:
    """GOMP_SPINCOUNT=3000 (a short OpenMP spin, see start_workers) unless the environment names a wait policy or
    a spin count."""
    return {} if {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys() else {"GOMP_SPINCOUNT": CPU_SPIN_COUNT}


def run_worker(*args) -> None:
    """A TP worker's body (worker_proc.main.run_worker), imported in the worker only: spawn pickles the target
    by name, and worker_proc.main imports torch, seconds of CPU the launcher would spend for nothing."""
    from worker_proc.main import run_worker as worker_main

    worker_main(*args)


def start_workers(group: ProcessGroup, args: ServerArgs, ipc: IpcPaths, model_dir: str) -> None:
    """Spawn this node's TP workers (`--node-rank`'s share of `--tp-size`)."""
    args_json = msgspec.json.encode(args)
    # A CPU worker's OpenMP threads wait for each other between operators: a short spin (libgomp's
    # GOMP_SPINCOUNT, then sleep) saves the wake-up per operator on an otherwise idle machine, where sleeping
    # at once (OMP_WAIT_POLICY=PASSIVE) makes decode slower; libgomp's long default spin makes it slower still
    # where other busy processes share the cores (docs/deploy.md has the measurements). Read by libgomp at
    # import; either variable set in the environment wins.
    spin = short_spin_env()
    for rank in NodeLayout.of(args).local_ranks:
        group.add(run_worker, f"worker-{rank}", args_json, ipc.root, rank, model_dir, os.getpid(), env=spin)
