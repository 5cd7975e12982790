"""The gateway's end of the tokenizer processes: submit generations, route chunks back, control calls.

Runs in the launcher's event loop. Tokenizer `crc32(rid) % N` owns a request: its GenerateText
and its Abort go there, so the two never overtake each other.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import zlib
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from radixserve import wire
from radixserve.errors import ApiError, bad_request
from radixserve.ipc import IpcPaths


class Generation:
    """The sub-requests of one HTTP request, in choice order, filled in by `TokenizerClient.run`.

    Invariant: `latest[i]` is sub-request i's output so far (its chunks merged), and `fresh` holds the
    indices updated since the consumer last looked, so a slow consumer skips stale chunks.
    """

    def __init__(self, reqs: list[wire.GenerateText]) -> None:
        self.reqs = reqs
        self.latest: list[wire.TextChunk | None] = [None] * len(reqs)
        self.fresh: dict[int, None] = {}  # an ordered set
        self.unfinished = len(reqs)
        self.user_aborted: set[int] = set()
        self.error: ApiError | None = None
        self._event = asyncio.Event()
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    @property
    def done(self) -> bool:
        return self.unfinished == 0 or self.error is not None

    def update(self, index: int, chunk: wire.TextChunk) -> None:
        if self.latest[index] is None:
            self.latest[index] = chunk
        else:
            self.latest[index].merge(chunk)
        self.fresh[index] = None
        if chunk.finished:
            self.unfinished -= 1
            finish = chunk.meta.get("finish_reason") or {}
            if finish.get("type") == "abort" and index not in self.user_aborted and self.error is None:
                self.error = ApiError(finish.get("status_code") or 400, finish.get("message") or "the request was rejected")
        self._event.set()

    def fail(self, error: ApiError) -> None:
        self.error = self.error or error
        self._event.set()

    async def results(self) -> list[wire.TextChunk]:
        """The final chunks; raises the request's error, if any."""
        while not self.done:
            await self._wait()
        if self.error is not None:
            raise self.error
        return self.latest  # type: ignore[return-value]

    async def updates(self) -> AsyncIterator[list[tuple[int, wire.TextChunk]]]:
        """Batches of (index, newest chunk) until all finish; raises the request's error."""
        while True:
            if self.error is not None:
                raise self.error
            if self.fresh:
                batch = [(i, self.latest[i]) for i in self.fresh]
                self.fresh = {}
                yield batch  # type: ignore[misc]
            elif self.unfinished == 0:
                return
            else:
                await self._wait()

    async def _wait(self) -> None:
        await self._event.wait()
        self._event.clear()


def _push(ctx: zmq.Context, addr: str) -> zmq.Socket:
    """A PUSH socket that never blocks the event loop (the number of requests is capped instead)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    return sock


class TokenizerClient:
    def __init__(self, ipc: IpcPaths, num_tokenizers: int, max_pending: int) -> None:
        self._actx = zmq.asyncio.Context()
        self._ctx = zmq.Context()
        self._inbox = self._actx.socket(zmq.PULL)
        self._inbox.bind(ipc.gateway_in)
        self._outs = [_push(self._ctx, ipc.tokenizer_in(i)) for i in range(num_tokenizers)]
        self._decoder = wire.decoder(wire.TokenizerOut)
        self._pending: dict[str, tuple[Generation, int]] = {}
        self._calls: dict[str, asyncio.Future[wire.ControlReply]] = {}
        self._call_ids = itertools.count()
        self._max_pending = max_pending
        self._ready_replies = 0
        self.ready = asyncio.Event()
        self.worker_info: dict = {}

    # ------------------------------------------------------------ generation

    def submit(self, reqs: list[wire.GenerateText]) -> Generation:
        rids = [r.rid for r in reqs]
        if len(set(rids)) != len(rids) or any(rid in self._pending for rid in rids):
            raise bad_request("a request with this rid is already running", "rid")
        if len(self._pending) + len(reqs) > self._max_pending:
            raise ApiError(429, f"too many requests in flight ({len(self._pending)}); retry later")
        gen = Generation(reqs)
        for i, req in enumerate(reqs):
            self._pending[req.rid] = (gen, i)
            self._send(req.rid, req)
        return gen

    def cancel(self, gen: Generation) -> None:
        """Abort what is left of `gen` (its client left, or it failed); its KV is released."""
        for req in gen.reqs:
            if self._pending.pop(req.rid, None) is not None:
                self._send(req.rid, wire.Abort(rid=req.rid))

    def abort(self, rid: str) -> bool:
        """Abort one running request on a client's behalf: it finishes with reason `abort`."""
        entry = self._pending.get(rid)
        if entry is None:
            return False
        entry[0].user_aborted.add(entry[1])
        self._send(rid, wire.Abort(rid=rid))
        return True

    def abort_all(self) -> int:
        return sum(self.abort(rid) for rid in list(self._pending))

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------ control plane

    async def control(self, op: str, args: dict | None = None, timeout: float = 30.0) -> wire.ControlReply:
        call_id = f"{op}-{next(self._call_ids)}"
        fut = self._calls[call_id] = asyncio.get_running_loop().create_future()
        self._outs[0].send(wire.encoder.encode(wire.Control(call_id=call_id, op=op, args=args or {})))
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ApiError(503, f"the scheduler did not answer {op!r} within {timeout:.0f} s") from None
        finally:
            self._calls.pop(call_id, None)

    def shutdown_backend(self) -> None:
        """Ask every tokenizer to forward `shutdown` to the scheduler and exit."""
        for sock in self._outs:
            sock.send(wire.encoder.encode(wire.Control(call_id="shutdown", op="shutdown")))

    def fail_all(self, error: ApiError) -> None:
        for gen, _ in list(self._pending.values()):
            gen.fail(error)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(error)

    # ------------------------------------------------------------ receiving

    async def run(self) -> None:
        while True:
            frame = await self._inbox.recv(copy=False)
            msg = self._decoder.decode(frame.buffer)
            if isinstance(msg, wire.TextBatch):
                for chunk in msg.chunks:
                    self._on_chunk(chunk)
            elif isinstance(msg, wire.TextChunk):
                self._on_chunk(msg)
            elif msg.call_id == "ready":
                self._ready_replies += 1
                self.worker_info = msg.result
                if self._ready_replies == len(self._outs):
                    self.ready.set()
            elif (fut := self._calls.get(msg.call_id)) is not None and not fut.done():
                fut.set_result(msg)

    def _on_chunk(self, chunk: wire.TextChunk) -> None:
        entry = self._pending.get(chunk.rid)
        if entry is None:
            return  # cancelled: its client is gone
        if chunk.finished:
            del self._pending[chunk.rid]
        entry[0].update(entry[1], chunk)

    def _send(self, rid: str, msg: wire.GenerateText | wire.Abort) -> None:
        self._outs[zlib.crc32(rid.encode()) % len(self._outs)].send(wire.encoder.encode(msg))

    def close(self) -> None:
        self._inbox.close(linger=0)
        self._actx.term()
        self._ctx.destroy(linger=500)
