"""`radixserve serve --dp-size N`: N data-parallel replicas behind SGLang's own router: `--router-package`
sglang-router (PyPI `sglang-router`, the default) or smg (PyPI `smg`, SGLang's model gateway, its successor; the
same Rust router, the same Python entry point under another package name).

Replica i is a whole radixserve server (its own gateway, tokenizers, scheduler and --tp-size workers on GPUs
[base + i*tp, base + (i+1)*tp)) on 127.0.0.1 at --router-dp-worker-base-port + i (default: free ports); once
all of them answer /health the router starts on --host/--port with --router-policy (cache_aware by default,
as SGLang's router). Replicas and router are children of this launcher, supervised as any other: one that
exits stops all of them with exit code 1. SIGTERM drains: each replica gets SIGTERM (its own drain, up to
--shutdown-timeout) while the router keeps passing their answers, then the router stops; SIGINT stops the
replicas at once. The manual form (several `radixserve serve` and `python -m sglang_router.launch_router` or
`smg launch`, on one machine or many) is in README.md.
"""

from __future__ import annotations

import http.client
import importlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

import msgspec

from radixserve import sdnotify
from radixserve.config import ServerArgs
from radixserve.kv_events import KVEventsConfig
from radixserve.launch.supervisor import ChildDied, ProcessGroup
from radixserve.procutil import die_with_parent

log = logging.getLogger("radixserve.dp")

REPLICA_HOST = "127.0.0.1"
POLL_S = 0.2
STOP_NOW_S = 8.0  # SIGINT: a replica stops within STOP_GRACE_S + STOP_KILL_S (serve.py)
DRAIN_EXTRA_S = 15.0  # SIGTERM: past --shutdown-timeout, for the aborted requests' last outputs and the stop
ROUTER_LOG_LEVEL = {"debug": "debug", "info": "warn", "warning": "warn", "error": "error",  # its info is per step
                    "critical": "error"}
ReplicaTarget = Callable[[bytes, int], None]
ROUTER_MODULES = {"sglang-router": "sglang_router", "smg": "smg"}  # --router-package -> its Python package


def serve_dp(args: ServerArgs, replica_target: ReplicaTarget) -> int:
    """Run the replicas (each `replica_target(args_json, parent_pid)`, serve.py's) and the router until a
    signal (exit 0) or until any of them exits (exit 1)."""
    return _DataParallel(args, replica_target).run()


def replica_ports(args: ServerArgs) -> list[int]:
    if args.router_dp_worker_base_port is not None:
        return [args.router_dp_worker_base_port + i for i in range(args.dp_size)]
    return _free_ports(args.dp_size)


def router_argv(args: ServerArgs, ports: list[int], prometheus_port: int) -> list[str]:
    """`python -m sglang_router.launch_router` (or `smg launch`) flags for this server's replicas."""
    argv = ["--host", args.host, "--port", str(args.port), "--policy", args.router_policy,
            "--worker-urls", *[f"http://{REPLICA_HOST}:{p}" for p in ports],
            "--prometheus-host", REPLICA_HOST, "--prometheus-port", str(prometheus_port),
            "--log-level", ROUTER_LOG_LEVEL[args.log_level], "--shutdown-grace-period-secs", "1"]
    if args.router_balance_abs_threshold is not None:
        argv += ["--balance-abs-threshold", str(args.router_balance_abs_threshold)]
    return argv + (["--api-key", args.api_key] if args.api_key else [])


def run_router(package: str, argv: list[str], parent_pid: int) -> None:
    """The router's process (a child of the launcher, so the argv, with any API key, is not on a command line);
    `package`: --router-package's Python package.

    Starts the Rust router directly: `sglang_router.launch_router` also imports the Python mini load balancer,
    whose FastAPI / uvicorn stack a deployment may not have."""
    die_with_parent(parent_pid)
    import argparse

    import setproctitle

    Router = importlib.import_module(f"{package}.router").Router
    RouterArgs = importlib.import_module(f"{package}.router_args").RouterArgs
    parser = argparse.ArgumentParser(prog=package)
    RouterArgs.add_cli_args(parser, use_router_prefix=False)
    router_args = RouterArgs.from_cli_args(parser.parse_args(argv), use_router_prefix=False)
    router_args._validate_router_args()
    setproctitle.setproctitle("sglang::router")  # the name SGLang's own launcher gives it, for ps and tests
    Router.from_args(router_args).start()


class _DataParallel:
    def __init__(self, args: ServerArgs, replica_target: ReplicaTarget) -> None:
        self.args = args
        self.replica_target = replica_target
        self.replicas = ProcessGroup()
        self.router = ProcessGroup()
        self.signal: int | None = None

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signal = signum

    def run(self) -> int:
        package = ROUTER_MODULES[self.args.router_package]
        try:
            importlib.import_module(package)
        except ImportError:
            extra = "router" if package == "sglang_router" else "smg"
            log.error("--dp-size with --router-package %s needs it installed: pip install 'radixserve[%s]'",
                      self.args.router_package, extra)
            return 1
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        args, ports = self.args, replica_ports(self.args)
        try:
            for i, port in enumerate(ports):
                # KV events: replica i publishes on the configured ports + i (radixserve/kv_events.py).
                events = KVEventsConfig.parse(args.kv_events_config).for_rank(i) if args.kv_events_config else None
                replica = args.replace(host=REPLICA_HOST, port=port, dp_size=1, kv_events_config=events,
                                       base_gpu_id=args.base_gpu_id + i * args.tp_size)
                self.replicas.add(self.replica_target, f"replica-{i}", msgspec.json.encode(replica), os.getpid())
            log.info("replicas on ports %s; the router starts once they are up", ports)
            if not self._until(lambda: all(_get(REPLICA_HOST, p, "/health") == 200 for p in ports)):
                return self._stop()
            self.router.add(run_router, "router", package, router_argv(args, ports, _free_ports(1)[0]), os.getpid())
            router_host = REPLICA_HOST if args.host in ("0.0.0.0", "::") else args.host
            # Ready once the router routes to every replica and has read each one's load: smg answers /readiness
            # with one worker registered and registers the others in the background (the first requests went to
            # a few), and its load-aware policies see every replica from the first request.
            if not self._until(lambda: _get(router_host, args.port, "/readiness") == 200
                               and _routed_workers(router_host, args.port) == args.dp_size):
                return self._stop()
            url = f"http://{args.host}:{args.port}"
            print(f"radixserve is ready: {url} ({args.dp_size} replicas behind {args.router_package}, policy "
                  f"{args.router_policy}; OpenAI API at {url}/v1)", flush=True)
            sdnotify.ready(f"serving {args.dp_size} replicas at {url}")
            self._until(lambda: False)
            return self._stop()
        except ChildDied as e:
            log.error("%s: stopping the server", e)
            return self._stop(failed=True)

    def _until(self, done: Callable[[], bool]) -> bool:
        """Poll `done` until true (True) or until a signal (False); ChildDied if a child exits meanwhile."""
        while self.signal is None:
            self.replicas.check()
            self.router.check()
            if done():
                return True
            time.sleep(POLL_S)
        return False

    def _stop(self, failed: bool = False) -> int:
        sdnotify.stopping()
        drain = self.signal == signal.SIGTERM and not failed
        for p in self.replicas.procs:  # their own stop: SIGTERM drains, SIGINT stops now
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM if drain else signal.SIGINT)
        self.replicas.wait_exited(self.args.shutdown_timeout + DRAIN_EXTRA_S if drain else STOP_NOW_S)
        for group in (self.router, self.replicas):  # the router, and any replica still there
            group.stop(timeout=2.0)
        return 1 if failed else 0


def _get(host: str, port: int, path: str) -> int | None:
    """Status of GET http://host:port/path, or None if nothing answers."""
    return _get_body(host, port, path)[0]


def _get_body(host: str, port: int, path: str) -> tuple[int | None, bytes]:
    """(status, body) of GET http://host:port/path; (None, b"") if nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError:
        return None, b""
    finally:
        conn.close()


def _routed_workers(host: str, port: int) -> int:
    """Workers that the router may route to (GET /workers: smg marks each `is_healthy`, sglang-router lists those
    it routes to) and whose load it has read (GET /get_loads: smg's `loads`, sglang-router's `workers`)."""
    workers, loads = _get_json(host, port, "/workers"), _get_json(host, port, "/get_loads")
    routed = {w.get("url") for w in workers.get("workers", []) if isinstance(w, dict) and w.get("is_healthy", True)}
    loaded = {w.get("worker") for w in loads.get("loads", []) + loads.get("workers", []) if isinstance(w, dict)}
    return len(routed & loaded)


def _get_json(host: str, port: int, path: str) -> dict:
    """GET http://host:port/path as a JSON object; {} if it does not answer 200 with one."""
    status, body = _get_body(host, port, path)
    try:
        value = msgspec.json.decode(body) if status == 200 else {}
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((REPLICA_HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
