"""ZeroMQ addresses and socket helpers. The receiving side of every PUSH/PULL pair binds."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import msgspec
import zmq

from radixserve import wire


@dataclass(frozen=True)
class IpcPaths:
    """`ipc://` endpoints under one private directory per server."""

    root: str

    @staticmethod
    def create() -> IpcPaths:
        return IpcPaths(tempfile.mkdtemp(prefix="radixserve-"))

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


class Receiver:
    """A bound PULL socket decoding one channel's tagged union."""

    def __init__(self, ctx: zmq.Context, addr: str, channel: object) -> None:
        self.sock = ctx.socket(zmq.PULL)
        self.sock.bind(addr)
        self._decoder = wire.decoder(channel)

    def recv(self, timeout_ms: int | None = None) -> msgspec.Struct | None:
        """Next message, or None if none arrived within timeout_ms (None blocks)."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        return self._decoder.decode(self.sock.recv(copy=False).buffer)

    def drain(self) -> list[msgspec.Struct]:
        out = []
        while self.sock.poll(0):
            out.append(self._decoder.decode(self.sock.recv(copy=False).buffer))
        return out


class Sender:
    """A connected PUSH socket."""

    def __init__(self, ctx: zmq.Context, addr: str) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)

    def send(self, msg: msgspec.Struct) -> None:
        self.sock.send(wire.encoder.encode(msg), copy=False)

    def send_bytes(self, data: bytes) -> None:
        self.sock.send(data, copy=False)
