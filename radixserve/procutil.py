"""Child-process plumbing: die with the parent, log alike, and start children by spawn."""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


@functools.cache
def _libc() -> ctypes.CDLL:
    """glibc (OSError where there is none), for prctl and mallopt."""
    return ctypes.CDLL("libc.so.6", use_errno=True)


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed blocks for reuse: blocks under `mmap_threshold` come from the heap, and
    the heap is returned to the kernel only past `trim_threshold` free bytes. A CPU worker allocates the same
    large activations every step; otherwise each one is fresh pages, a page fault and zeroing every time.
    Returns False where the C library is not glibc."""
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = _libc()
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold) and libc.mallopt(m_trim_threshold, trim_threshold))
    except (OSError, AttributeError):
        return False


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


def die_with_parent(parent_pid: int) -> None:
    """Make sure this process never outlives `parent_pid`: kernel signal plus a watcher thread."""
    try:
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def child_init(name: str, parent_pid: int, log_level: str) -> None:
    """First lines of every child's entry point. `kill -USR1 PID` then writes every thread's Python stack to the
    child's stderr (the server's log) and the child carries on: what a hung or slow process is doing."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the launcher, which stops us in order
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    setup_logging(log_level)
    try:
        import setproctitle  # optional nicety: the whole command line
        setproctitle.setproctitle(f"radixserve::{name}")
    except ImportError:
        pass
    try:  # the kernel's name for it (top, ps -o comm, /proc/PID/comm), at most 15 bytes: always there
        _libc().prctl(PR_SET_NAME, name.encode()[:15])
    except OSError:
        pass


# Processes that do host work only (tokenizers, the scheduler) run their numeric libraries on one thread, so
# that idle OpenMP / BLAS threads do not spin on the cores the workers compute on.
HOST_ONLY_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "TOKENIZERS_PARALLELISM": "false"}


def spawn(target, name: str, *args, env: dict[str, str] | None = None) -> mp.Process:
    """Start `target(*args)` in a fresh interpreter; `env` is added to the environment it starts with (read by
    libraries at import, before the target runs)."""
    proc = mp.get_context("spawn").Process(target=target, name=name, args=args, daemon=False)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return proc
