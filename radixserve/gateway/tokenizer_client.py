"""The gateway's end of the tokenizer processes: submit generations, route deltas back, control calls.

Runs in the launcher's event loop. Tokenizer `crc32(rid) % N` owns a request: its GenerateText
and its Abort go there, so the two never overtake each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from radixserve import wire
from radixserve.errors import ApiError, bad_request
from radixserve.ipc import IpcPaths
from radixserve.native_api import Output
from radixserve.stats import GetTokenizerStats, TokenizerStats

log = logging.getLogger("radixserve.http")


def merge(deltas: list[wire.TextDelta]) -> wire.TextDelta:
    """Consecutive deltas of one request as one (what a slow consumer missed), in O(their size)."""
    if len(deltas) == 1:
        return deltas[0]
    out = Output()
    for d in deltas:
        out.add(d)
    last = deltas[-1]
    return wire.TextDelta(
        rid=last.rid, text=out.text, output_ids=out.output_ids, prompt_tokens=last.prompt_tokens,
        cached_tokens=last.cached_tokens, completion_tokens=last.completion_tokens, finish=last.finish,
        output_logprobs=out.output_logprobs if last.output_logprobs is not None else None,
        output_top_logprobs=out.output_top_logprobs if last.output_top_logprobs is not None else None,
        input_logprobs=out.input_logprobs, input_top_logprobs=out.input_top_logprobs, spec=last.spec)


class Generation:
    """The sub-requests of one HTTP request, in choice order, filled in by `TokenizerClient.run`.

    Invariant: `last[i]` is sub-request i's newest delta (current counts and finish); a streamed
    generation queues the deltas each consumer has not seen in `pending`, a non-streamed one adds them
    to `outputs[i]`, so each delta is handled once whatever the stream's length."""

    def __init__(self, reqs: list[wire.GenerateText], stream: bool) -> None:
        self.reqs = reqs
        self.last: list[wire.TextDelta | None] = [None] * len(reqs)
        self.outputs: list[Output] | None = None if stream else [Output() for _ in reqs]
        self.pending: dict[int, list[wire.TextDelta]] = {}  # insertion-ordered: the order updates came in
        self.unfinished = len(reqs)
        self.error: ApiError | None = None
        self._event = asyncio.Event()
        self.started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.unfinished == 0 or self.error is not None

    def update(self, index: int, delta: wire.TextDelta) -> None:
        self.last[index] = delta
        if self.outputs is not None:
            self.outputs[index].add(delta)
        else:
            self.pending.setdefault(index, []).append(delta)
        if delta.finish is not None:
            self.unfinished -= 1
        self._event.set()

    def fail(self, error: ApiError) -> None:
        self.error = self.error or error
        self._event.set()

    async def results(self) -> list[Output]:
        """The whole outputs (a non-streamed generation); raises the request's error, if any."""
        assert self.outputs is not None, "a streamed generation has no results()"
        while not self.done:
            await self._wait()
        if self.error is not None:
            raise self.error
        return self.outputs

    async def updates(self) -> AsyncIterator[list[tuple[int, wire.TextDelta]]]:
        """Batches of (index, what is new for it) until all finish; raises the request's error."""
        while True:
            if self.error is not None:
                raise self.error
            if self.pending:
                batch = [(i, merge(ds)) for i, ds in self.pending.items()]
                self.pending = {}
                yield batch
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
        self._call_ids = wire.CallIds()
        self._max_pending = max_pending
        self._ready_replies = 0
        self.ready = asyncio.Event()
        self.runtime: wire.RuntimeInfo | None = None
        self.tool_call_format: wire.ToolCallFormat = wire.HERMES  # the tokenizers' (their Ready), before any request
        self.draining = False  # set once, on SIGTERM (launch/serve.py): no new work is taken from then on

    # ------------------------------------------------------------ generation

    def submit(self, reqs: list[wire.GenerateText], stream: bool = False) -> Generation:
        """Register and send `reqs`. Every message is encoded before anything is registered, so a request
        that cannot be sent leaves nothing behind."""
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        rids = [r.rid for r in reqs]
        if len(set(rids)) != len(rids) or any(rid in self._pending for rid in rids):
            raise bad_request("a request with this rid is already running", "rid")
        if len(self._pending) + len(reqs) > self._max_pending:
            raise ApiError(429, f"too many requests in flight ({len(self._pending)}); retry later")
        try:
            frames = [wire.encoder.encode(req) for req in reqs]
        except (OverflowError, TypeError, ValueError) as e:
            raise bad_request(f"the request cannot be encoded: {e}") from None
        gen = Generation(reqs, stream)
        try:
            for i, (req, frame) in enumerate(zip(reqs, frames, strict=True)):
                self._pending[req.rid] = (gen, i)
                self._route(req.rid).send(frame)
        except zmq.ZMQError as e:  # nothing may stay registered: abort what went out, forget the rest
            with contextlib.suppress(zmq.ZMQError):
                self.cancel(gen)
            for req in reqs:
                self._pending.pop(req.rid, None)
            raise ApiError(503, f"cannot reach the tokenizer: {e}") from None
        return gen

    def cancel(self, gen: Generation) -> None:
        """Abort what is left of `gen` (its client left, or it failed); its KV is released."""
        for req in gen.reqs:
            if self._pending.pop(req.rid, None) is not None:
                self._send(req.rid, wire.Abort(rid=req.rid))

    def abort(self, rid: str, message: str | None = None) -> bool:
        """Abort one running request on a client's behalf: it finishes with reason `abort` (and `message`)."""
        if rid not in self._pending:
            return False
        finish = wire.FinishReason(type="abort", message=message) if message else None
        self._send(rid, wire.Abort(rid=rid, finish=finish))
        return True

    def abort_all(self, message: str | None = None) -> int:
        return sum(self.abort(rid, message) for rid in list(self._pending))

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------ control plane

    async def control(self, kind: type[wire.Call], timeout: float = 30.0, **fields: object) -> wire.ControlReply:
        """Call the scheduler (through tokenizer 0) and wait for its reply."""
        return await self._call(0, kind, "the scheduler", timeout, **fields)

    async def tokenizer_stats(self, timeout: float = 10.0) -> TokenizerStats:
        """Every tokenizer's TokenizerStats, summed."""
        replies = await asyncio.gather(*(self._call(i, GetTokenizerStats, f"tokenizer {i}", timeout)
                                         for i in range(len(self._outs))))
        stats = [r.result for r in replies]
        assert all(isinstance(s, TokenizerStats) for s in stats)
        return sum(stats[1:], stats[0])

    async def _call(self, to: int, kind: type, callee: str, timeout: float, **fields: object) -> wire.ControlReply:
        call = self._call_ids.call(kind, **fields)
        call_id = call.call_id
        frame = wire.encoder.encode(call)
        fut = self._calls[call_id] = asyncio.get_running_loop().create_future()
        try:
            self._outs[to].send(frame)
            return await asyncio.wait_for(fut, timeout)
        except zmq.ZMQError as e:
            raise ApiError(503, f"cannot reach {callee}: {e}") from None
        except asyncio.TimeoutError:
            raise ApiError(503, f"{callee} did not answer {kind.__name__} within {timeout:.0f} s") from None
        finally:
            self._calls.pop(call_id, None)

    def shutdown_backend(self) -> None:
        """Ask every tokenizer to forward the shutdown to the scheduler and exit."""
        for sock in self._outs:
            sock.send(wire.encoder.encode(wire.ShutdownServer()))

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
                for delta in msg.deltas:
                    self._on_delta(delta)
            elif isinstance(msg, wire.Rejected):
                entry = self._pending.pop(msg.rid, None)
                if entry is not None:
                    self.cancel(entry[0])  # the request fails as a whole: its other sub-requests stop too
                    entry[0].fail(ApiError(msg.status, msg.message))
            elif isinstance(msg, wire.Ready):
                self._on_ready(msg)
            elif (fut := self._calls.get(msg.call_id)) is not None and not fut.done():
                fut.set_result(msg)

    def _on_ready(self, msg: wire.Ready) -> None:
        if msg.runtime is None:
            log.error("the server failed to start: %s", msg.error)
            return
        self.runtime = msg.runtime
        assert msg.tool_call_format is not None, "a tokenizer passes Ready on with its tool-call format"
        self.tool_call_format = msg.tool_call_format
        self._ready_replies += 1
        if self._ready_replies == len(self._outs):
            self.ready.set()

    def _on_delta(self, delta: wire.TextDelta) -> None:
        entry = self._pending.get(delta.rid)
        if entry is None:
            return  # cancelled: its client is gone
        if delta.finish is not None:
            del self._pending[delta.rid]
        entry[0].update(entry[1], delta)

    def _route(self, rid: str) -> zmq.Socket:
        return self._outs[zlib.crc32(rid.encode()) % len(self._outs)]

    def _send(self, rid: str, msg: wire.Abort) -> None:
        self._route(rid).send(wire.encoder.encode(msg))

    def close(self) -> None:
        self._inbox.close(linger=0)
        self._actx.term()
        self._ctx.destroy(linger=500)
