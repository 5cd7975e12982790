"""`radixserve serve`: run the gateway here and the tokenizers, scheduler and workers as children.

Supervision: if any child exits, the server stops loudly and exits 1. SIGTERM drains first (as vLLM, and
what an orchestrator sends): no new work is taken (503, the health routes too), requests in flight have
--shutdown-timeout seconds to finish, then the rest end with finish reason `abort`. SIGINT (Ctrl-C), or a
second SIGTERM, stops at once. Stopping goes in order (tokenizers forward `shutdown` to the scheduler, which
stops the workers), and whatever is left after STOP_GRACE_S is terminated, then killed: everything is gone
within 10 s; the exit code is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import time

import msgspec
import uvloop
from aiohttp import web

from radixserve import sdnotify, wire
from radixserve.config import ServerArgs
from radixserve.errors import ApiError
from radixserve.gateway.app import Gateway
from radixserve.gateway.http_errors import ApiAppRunner
from radixserve.gateway.tokenizer_client import TokenizerClient
from radixserve.ipc import IpcPaths
from radixserve.launch.multinode import HeadLinks
from radixserve.launch.supervisor import ChildDied, ProcessGroup, start_backend
from radixserve.procutil import HOST_ONLY_ENV, die_with_parent, setup_logging

log = logging.getLogger("radixserve")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
STOP_GRACE_S = 4.0  # orderly exit of the children, then SIGTERM, then SIGKILL after STOP_KILL_S
STOP_KILL_S = 2.0
HTTP_DRAIN_S = 1.0
ABORT_GRACE_S = 5.0  # past --shutdown-timeout, for the aborted requests' final outputs to reach their clients


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    ServerArgs.add_cli_args(parser)


def run(ns: argparse.Namespace) -> int:
    return serve(ServerArgs.from_cli_args(ns))


def serve(args: ServerArgs) -> int:
    """Serve until SIGINT/SIGTERM (exit 0) or until a child dies (exit 1)."""
    setup_logging(args.log_level)
    from radixserve.model_files import resolve_model

    try:
        model_dir = resolve_model(args.model_path, args.download_dir, args.revision)
    except (OSError, RuntimeError, ValueError) as e:
        log.error("cannot load the model: %s", e)
        return 1
    if args.dp_size > 1:
        from radixserve.launch.dp import serve_dp

        return serve_dp(args, run_replica)
    if args.node_rank > 0:
        from radixserve.launch.multinode import serve_node

        return serve_node(args, model_dir)
    return uvloop.run(_Server(args, model_dir).run())


def run_replica(args_json: bytes, parent_pid: int) -> None:
    """One data-parallel replica (launch/dp.py): a whole server of its own, that dies with the launcher."""
    die_with_parent(parent_pid)
    sys.exit(serve(msgspec.json.decode(args_json, type=ServerArgs)))


class _Server:
    def __init__(self, args: ServerArgs, model_dir: str) -> None:
        self.args = args
        self.model_dir = model_dir
        self.model_name = args.served_model_name or args.model_path or DEFAULT_MODEL_NAME
        self.group = ProcessGroup()
        self.stop = asyncio.Event()
        self.exit_code = 0
        self.links = HeadLinks(args, self._fatal)  # the other nodes' launchers, with --nnodes > 1
        self.drain: asyncio.Task | None = None  # started by the first SIGTERM

    def _fatal(self, message: str) -> None:
        if not self.stop.is_set():
            log.error("%s: stopping the server", message)
            self.exit_code = 1
            self.stop.set()

    async def run(self) -> int:
        args = self.args
        ipc = IpcPaths.create()
        client = TokenizerClient(ipc, args.tokenizer_worker_num, args.max_running_requests + args.max_queued_requests)
        gateway = Gateway(args, client, self.model_dir, self.model_name, self.group.procs)
        runner = ApiAppRunner(gateway.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, args.host, args.port, shutdown_timeout=HTTP_DRAIN_S).start()
            self.links.start()
        except OSError as e:
            log.error("cannot listen: %s", e)
            await runner.cleanup()
            client.close()
            shutil.rmtree(ipc.root, ignore_errors=True)
            return 1
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm, client)
        tasks = [asyncio.create_task(c) for c in (client.run(), self._watch(), self._announce(client),
                                                   self._systemd_watchdog(client))]
        tasks[0].add_done_callback(self._receiver_done)
        try:
            self._spawn(ipc)
            await self.stop.wait()
        finally:
            log.info("stopping the server")
            self.links.stop(None if self.exit_code == 0 else "node 0 failed (its log says why)")
            if self.drain is None:
                sdnotify.stopping()
            else:
                self.drain.cancel()
            client.fail_all(ApiError(503, "the server is shutting down"))
            await runner.cleanup()
            if self.exit_code == 0 and client.ready.is_set():  # else someone may not be listening yet
                client.shutdown_backend()
                await asyncio.to_thread(self.group.wait_exited, STOP_GRACE_S)  # the loop serves meanwhile
            for t in tasks:
                t.cancel()
            self.group.stop(timeout=STOP_KILL_S)
            client.close()
            shutil.rmtree(ipc.root, ignore_errors=True)
        return self.exit_code

    def _spawn(self, ipc: IpcPaths) -> None:
        from tokenizer_proc.main import run_tokenizer

        args_json = msgspec.json.encode(self.args)
        for i in range(self.args.tokenizer_worker_num):
            self.group.add(run_tokenizer, f"tokenizer-{i}", args_json, ipc.root, i, self.model_dir, os.getpid(),
                           env=HOST_ONLY_ENV)
        start_backend(self.group, self.args, ipc, self.model_dir, num_replies=self.args.tokenizer_worker_num)

    def _on_sigterm(self, client: TokenizerClient) -> None:
        """The first SIGTERM drains a serving server; a second one, or one while it loads, stops it now."""
        if self.drain is not None or not client.ready.is_set():
            self.stop.set()
            return
        log.info("SIGTERM: draining %d requests in flight (up to %g s)", client.num_pending, self.args.shutdown_timeout)
        sdnotify.stopping()
        client.draining = True
        self.drain = asyncio.create_task(self._drain_then_stop(client))

    async def _drain_then_stop(self, client: TokenizerClient) -> None:
        """Let the requests in flight finish within --shutdown-timeout, abort the rest, then stop."""
        timeout = self.args.shutdown_timeout
        if not await _until_idle(client, timeout):
            aborted = client.abort_all(f"the server shut down before the request finished "
                                       f"(--shutdown-timeout {timeout:g} s)")
            log.warning("shutdown timeout (%g s): aborted %d requests", timeout, aborted)
            await _until_idle(client, ABORT_GRACE_S)
        self.stop.set()

    def _receiver_done(self, task: asyncio.Task) -> None:
        if not task.cancelled():
            self._fatal(f"the gateway's receiver failed: {task.exception()!r}")

    async def _watch(self) -> None:
        while True:
            try:
                self.group.check()
            except ChildDied as e:
                return self._fatal(str(e))
            await asyncio.sleep(0.2)

    async def _announce(self, client: TokenizerClient) -> None:
        started = time.monotonic()
        await client.ready.wait()
        url = f"http://{self.args.host}:{self.args.port}"
        log.info("ready in %.1f s", time.monotonic() - started)
        print(f"radixserve is ready: {url} (model {self.model_name!r}; OpenAI API at {url}/v1)", flush=True)
        sdnotify.ready(f"serving {self.model_name} at {url}")

    async def _systemd_watchdog(self, client: TokenizerClient) -> None:
        """Under a systemd watchdog: ping while the scheduler loop answers (an O(1) control call)."""
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        await client.ready.wait()
        while True:
            try:
                await client.control(wire.GetServerInfo, timeout=interval / 2)
                sdnotify.watchdog()
            except ApiError as e:
                log.warning("systemd watchdog: no ping (%s)", e.message)
            await asyncio.sleep(interval / 2)


async def _until_idle(client: TokenizerClient, timeout: float) -> bool:
    """Wait until no request is in flight; False if some still are after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while client.num_pending:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True
