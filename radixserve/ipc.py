"""ZeroMQ addresses and socket helpers. The receiving side of every PUSH/PULL pair binds (one exception, a remote
rank's inbox: radixserve/nodes.py)."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import msgspec
import zmq

from radixserve import wire

log = logging.getLogger("radixserve.ipc")
PREFIX = "radixserve-"
OWNER_FILE = "owner"  # "<pid> <start time>" of the process that created the directory


def _start_time(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot), or None if it does not exist; tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def sweep_stale() -> list[str]:
    """Remove the ipc directories whose owner is gone (killed with SIGKILL, so it could not clean up).

    A directory without an owner file is left alone: it may be one that is being created right now."""
    removed = []
    for root in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")):
        try:
            with open(os.path.join(root, OWNER_FILE)) as f:
                pid, started = f.read().split()
        except (OSError, ValueError):
            continue
        if _start_time(int(pid)) != started:
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
    return removed


@dataclass(frozen=True)
class IpcPaths:
    """`ipc://` endpoints under one private directory per server; the directory names its owner process, so
    the next start removes it if that owner died without cleaning up (`sweep_stale`)."""

    root: str

    @staticmethod
    def create() -> IpcPaths:
        sweep_stale()
        root = tempfile.mkdtemp(prefix=PREFIX)
        with open(os.path.join(root, OWNER_FILE), "w") as f:
            f.write(f"{os.getpid()} {_start_time(os.getpid())}")
        return IpcPaths(root)

    def _addr(self, name: str) -> str:
        return f"ipc://{os.path.join(self.root, name)}"

    @property
    def scheduler_in(self) -> str:
        return self._addr("scheduler_in")

    def scheduler_out(self, index: int) -> str:
        """Where the scheduler sends outputs for reply_to == index (a tokenizer or the Engine)."""
        return self._addr(f"scheduler_out_{index}")

    def worker_in(self, rank: int) -> str:
        return self._addr(f"worker_in_{rank}")

    @property
    def worker_out(self) -> str:
        return self._addr("worker_out")

    def tokenizer_in(self, index: int) -> str:
        return self._addr(f"tokenizer_in_{index}")

    @property
    def gateway_in(self) -> str:
        return self._addr("gateway_in")

    @property
    def tp_init_method(self) -> str:
        return f"file://{os.path.join(self.root, 'tp_init')}"


class Undecodable(msgspec.Struct):
    """A request message whose values break its channel's types (every request number is bounded: wire.py), as
    Receiver returns it instead of stopping the process: the receiver answers its `rid` with a 400."""

    error: str
    rid: str
    reply_to: int = 0

    def rejection(self) -> wire.Rejected:
        return wire.Rejected(self.rid, 400, f"cannot run the request: {self.error}")


class Receiver:
    """A bound PULL socket decoding one channel's tagged union."""

    def __init__(self, ctx: zmq.Context, addr: str, channel: object, bind: bool = True) -> None:
        self.sock = ctx.socket(zmq.PULL)
        if bind:
            self.sock.bind(addr)
        else:  # a remote rank's inbox (nodes.py)
            self.sock.connect(addr)
        self._decoder = wire.decoder(channel)

    def recv(self, timeout_ms: int | None = None) -> msgspec.Struct | None:
        """Next message, or None if none arrived within timeout_ms (None blocks)."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        return self._decode(self.sock.recv(copy=False).buffer)

    def drain(self) -> list[msgspec.Struct]:
        out = []
        while self.sock.poll(0):
            out.append(self._decode(self.sock.recv(copy=False).buffer))
        return out

    def _decode(self, buf: memoryview) -> msgspec.Struct:
        """The message; Undecodable for a request (a message with a `rid`) whose values break the channel's types.
        Anything else that does not decode is a fault of the sender's code and raises."""
        try:
            return self._decoder.decode(buf)
        except msgspec.ValidationError as e:
            head = msgspec.msgpack.decode(buf)
            if not (isinstance(head, dict) and isinstance(head.get("rid"), str)):
                raise
            log.warning("request %r has values out of range: %s", head["rid"], e)
            reply_to = head.get("reply_to", 0)
            return Undecodable(str(e), head["rid"], reply_to if isinstance(reply_to, int) else 0)


class Sender:
    """A connected PUSH socket."""

    def __init__(self, ctx: zmq.Context, addr: str, bind: bool = False) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        if bind:  # to a remote rank (nodes.py)
            self.sock.bind(addr)
        else:
            self.sock.connect(addr)

    def send(self, msg: msgspec.Struct) -> None:
        self.sock.send(wire.encoder.encode(msg), copy=False)

    def send_bytes(self, data: bytes) -> None:
        self.sock.send(data, copy=False)
