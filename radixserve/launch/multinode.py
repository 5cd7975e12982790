"""Tensor parallelism over several nodes: the launchers' link, and the launcher of a node other than 0.

Node 0's launcher (serve.py) listens on --dist-init-addr's PORT+1 (`HeadLinks`); every other node's launcher
(`serve_node`: workers only, no HTTP) connects there before it starts its workers, says who it is
(wire.NodeHello) and keeps the connection. Both ends send a wire.NodeHeartbeat every HEARTBEAT_S, so:
- a launcher killed (even with SIGKILL) closes its socket: the other end sees EOF at once;
- a node that hangs or is cut off falls silent: the other end gives up after LINK_TIMEOUT_S;
and either way every node stops with exit code 1 (their workers die with their launcher), well within 10 s,
instead of waiting in a torch.distributed collective that will never complete. On an orderly stop node 0
sends wire.NodeStop first; its scheduler's Shutdown ends the remote workers (exit 0), and the node exits 0.
The link runs on threads of its own, so a launcher busy importing torch or spawning children still beats.
Frames: a 4-byte big-endian length, then the msgpack message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

import msgspec

from radixserve import wire
from radixserve.config import ServerArgs
from radixserve.ipc import IpcPaths
from radixserve.launch.supervisor import ProcessGroup, start_workers
from radixserve.nodes import ANY_INTERFACE, NodeLayout

log = logging.getLogger("radixserve.nodes")

HEARTBEAT_S = 1.0
LINK_TIMEOUT_S = 5.0  # a link silent this long is a dead node
CONNECT_TIMEOUT_S = 1800.0  # a remote node waits this long for node 0's launcher to listen (it may be downloading)
STOP_GRACE_S = 4.0  # after NodeStop: the workers' own exit, then SIGTERM, then SIGKILL after STOP_KILL_S
STOP_KILL_S = 2.0
POLL_S = 0.1
# Flags that may differ between the nodes of one group; every other flag must be node 0's (a rank with other
# limits, dtype or context length would fail in a collective, or silently compute something else).
PER_NODE_FLAGS = frozenset({"node_rank", "host", "port", "base_gpu_id", "model_path", "tokenizer_path",
                            "download_dir", "log_level", "api_key"})
_FRAME = struct.Struct("!I")
_MAX_FRAME = 1 << 16
_decoder = wire.decoder(wire.NodeLink)


class LinkLost(Exception):
    pass


class _Link:
    """A connected node link; `send` is thread-safe, `recv` raises LinkLost on EOF, silence or garbage."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(LINK_TIMEOUT_S)
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, msg: msgspec.Struct) -> None:
        data = wire.encoder.encode(msg)
        with self.lock:
            try:
                self.sock.sendall(_FRAME.pack(len(data)) + data)
            except OSError:
                pass  # the reading side reports the lost link

    def recv(self) -> msgspec.Struct:
        (size,) = _FRAME.unpack(self._exactly(_FRAME.size))
        if size > _MAX_FRAME:
            raise LinkLost(f"a {size}-byte frame")
        try:
            return _decoder.decode(self._exactly(size))
        except msgspec.DecodeError as e:
            raise LinkLost(f"bad message: {e}") from None

    def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise LinkLost(f"no heartbeat for {LINK_TIMEOUT_S:g} s") from None
            except OSError as e:
                raise LinkLost(f"connection error ({e})") from None
            if not chunk:
                raise LinkLost("connection closed")
            buf += chunk
        return buf

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _thread(target: Callable, *args: object) -> None:
    threading.Thread(target=target, args=args, name="node-link", daemon=True).start()


def _beat(links: Callable[[], list[_Link]], stopped: threading.Event) -> None:
    while not stopped.wait(HEARTBEAT_S):
        for link in links():
            link.send(wire.NodeHeartbeat())


class HeadLinks:
    """Node 0's end: one link per remote node. `on_lost(message)` runs on the event loop that called `start` when
    any of them fails or joins with other flags: the server must stop."""

    def __init__(self, args: ServerArgs, on_lost: Callable[[str], None]) -> None:
        self.args = args
        self.port = NodeLayout.of(args).link_port
        self.on_lost = on_lost
        self.links: dict[int, _Link] = {}
        self.stopped = threading.Event()
        self.listener: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Listen for the other nodes (nothing to do on one node); OSError if the port is taken."""
        if self.args.nnodes == 1:
            return
        self.loop = asyncio.get_running_loop()
        self.listener = socket.create_server((ANY_INTERFACE, self.port))
        self.listener.settimeout(POLL_S)
        _thread(self._accept)
        _thread(_beat, lambda: list(self.links.values()), self.stopped)
        log.info("waiting for %d more nodes on port %d", self.args.nnodes - 1, self.port)

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            _thread(self._serve, _Link(conn))

    def _serve(self, link: _Link) -> None:
        try:
            hello = link.recv()
        except LinkLost as e:  # not one of ours (a port scan, a probe): ignore it
            log.warning("a connection to the node link port said no hello: %s", e)
            return link.close()
        if not isinstance(hello, wire.NodeHello):
            return link.close()
        rank = hello.node_rank
        problem = flag_mismatch(self.args, hello.server_args)
        if problem is None and (not 0 < rank < self.args.nnodes or rank in self.links):
            problem = f"node rank {rank} is out of range or already joined"
        if problem is not None:
            link.close()
            return self._lost(f"node {rank} cannot join: {problem}")
        self.links[rank] = link
        log.info("node %d joined from %s", rank, link.sock.getpeername())
        try:
            while True:
                msg = link.recv()
                if not isinstance(msg, wire.NodeHeartbeat):
                    raise LinkLost(f"unexpected {type(msg).__name__}")
        except LinkLost as e:
            self._lost(f"node {rank} is gone: {e}")

    def _lost(self, message: str) -> None:
        if not self.stopped.is_set():
            self.loop.call_soon_threadsafe(self.on_lost, message)

    def stop(self, error: str | None) -> None:
        """Tell every node that node 0 stops (`error`: why, if it failed), then close the links."""
        self.stopped.set()
        for link in list(self.links.values()):
            link.send(wire.NodeStop(error))
            link.close()
        if self.listener is not None:
            self.listener.close()


def flag_mismatch(ours: ServerArgs, theirs_json: bytes) -> str | None:
    """Which flags of another node differ from ours (but PER_NODE_FLAGS), or None if none do."""
    try:
        theirs = msgspec.json.decode(theirs_json, type=ServerArgs)
    except (msgspec.DecodeError, ValueError) as e:
        return f"unreadable flags ({e})"
    diff = [f"--{f.name.replace('_', '-')} {getattr(theirs, f.name)} (node 0: {getattr(ours, f.name)})"
            for f in dataclasses.fields(ServerArgs)
            if f.name not in PER_NODE_FLAGS and getattr(theirs, f.name) != getattr(ours, f.name)]
    return "other flags than node 0's: " + ", ".join(diff) if diff else None


def serve_node(args: ServerArgs, model_dir: str) -> int:
    """A node other than 0: join node 0's link, run this node's workers, stop when any node stops."""
    return _Node(args, model_dir).run()


class _Node:
    def __init__(self, args: ServerArgs, model_dir: str) -> None:
        self.args = args
        self.model_dir = model_dir
        self.layout = NodeLayout.of(args)
        self.group = ProcessGroup()
        self.signal: int | None = None
        self.lost: str | None = None  # set by the link thread
        self.node_stop: wire.NodeStop | None = None  # likewise

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signal = signum

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        link = self._connect()
        if link is None:
            return 0 if self.signal is not None else 1
        link.send(wire.NodeHello(self.args.node_rank, msgspec.json.encode(self.args.replace(api_key=None))))
        stopped = threading.Event()
        _thread(self._listen, link)
        _thread(_beat, lambda: [link], stopped)
        ipc = IpcPaths.create()
        try:
            start_workers(self.group, self.args, ipc, self.model_dir)
            log.info("node %d: workers %s started", self.args.node_rank, list(self.layout.local_ranks))
            code, message = self._supervise()
            (log.error if code else log.info)("%s: stopping node %d", message, self.args.node_rank)
        finally:
            stopped.set()
            link.close()
            self.group.stop(timeout=STOP_KILL_S)
            shutil.rmtree(ipc.root, ignore_errors=True)
        return code

    def _connect(self) -> _Link | None:
        host, port = self.layout.host, self.layout.link_port
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        log.info("node %d: joining node 0 at %s:%d", self.args.node_rank, host, port)
        while self.signal is None:
            try:
                return _Link(socket.create_connection((host, port), timeout=LINK_TIMEOUT_S))
            except OSError as e:
                if time.monotonic() > deadline:
                    log.error("node 0 did not answer at %s:%d within %g s (%s)", host, port, CONNECT_TIMEOUT_S, e)
                    return None
                time.sleep(0.5)
        return None

    def _listen(self, link: _Link) -> None:
        try:
            while not isinstance(msg := link.recv(), wire.NodeStop):
                pass
            self.node_stop = msg
        except LinkLost as e:
            self.lost = f"node 0 is gone: {e}"

    def _supervise(self) -> tuple[int, str]:
        """Wait for a reason to stop: (exit code, why)."""
        while True:
            if self.node_stop is not None:
                self.group.wait_exited(STOP_GRACE_S)
                error = self.node_stop.error
                return (1, f"node 0 stopped: {error}") if error else (0, "node 0 stopped")
            if self.lost is not None:
                return 1, self.lost
            if self.signal is not None:
                return 0, signal.Signals(self.signal).name
            # A worker that exits 0 was told to by the scheduler's Shutdown, which comes with node 0's NodeStop.
            for p in self.group.procs:
                if p.exitcode not in (None, 0):
                    return 1, f"{p.name} (pid {p.pid}) exited with code {p.exitcode}"
            time.sleep(POLL_S)
