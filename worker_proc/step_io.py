"""A step's traffic between host and device, without host syncs on the step path.

Uploads go through a ring of pinned staging memory (a pageable source may make the driver wait for the
stream, which would stall the next step's launch behind the step still running). Results come back on a
copy stream of their own: `PendingStep.result()` waits for that copy only, in the thread that sends them,
so the worker launches step N+1 while step N's tokens travel to the host.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from radixserve.wire import GrammarDone, StepBatch, StepResult, from_i32

PAD_SLOT = 0  # the KV slot that padding rows write; the scheduler never hands it out


class HostStaging:
    """Host-to-device copies of int32 arrays through one pinned ring of `capacity` ints (CUDA), or plain tensors
    (CPU). Each upload takes the ring's next stretch, so a step may make any number of them without waiting.

    Invariant: a stretch of the ring is rewritten only after the device has read what was staged there before
    (the event recorded after each copy, oldest first), so an upload never races the copies before it; the host
    waits only where a step's uploads come round the ring onto copies still queued behind the forward in flight."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.capacity = capacity
        self._ring = torch.empty(capacity, dtype=torch.int32, pin_memory=True) if self.cuda else None
        self._in_use: deque[tuple[int, int, torch.cuda.Event]] = deque()  # (start, end, copy done), oldest first
        self._next = 0

    def upload(self, host: np.ndarray, dst: torch.Tensor | None = None) -> torch.Tensor:
        """`host` (int32) on the device, in `dst` (a view of at least its length) or a new tensor."""
        src = torch.from_numpy(np.ascontiguousarray(host, dtype=np.int32))
        if dst is None:
            dst = torch.empty(len(host), dtype=torch.int32, device=self.device)
        dst = dst[:len(host)]
        if not len(host):
            return dst
        if not self.cuda or len(host) > self.capacity:  # (a huge prefill: a plain copy, which may wait for the stream)
            return dst.copy_(src)
        start = self._claim(len(host))
        end = start + len(host)
        staged = self._ring[start:end]
        staged.copy_(src)
        dst.copy_(staged, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._in_use.append((start, end, event))
        return dst

    def upload_parts(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        """Several integer arrays (values within int32) on the device as int64, in one upload: views of one tensor."""
        flat = self.upload(np.concatenate([np.asarray(x, dtype=np.int64).ravel() for x in parts])).long()
        return [v.view(np.shape(x)) for v, x in zip(flat.split([np.size(x) for x in parts]), parts, strict=True)]

    def _claim(self, n: int) -> int:
        """The start of the ring's next n > 0 ints (after _next, or at 0 where they do not fit before the end),
        once the copies from what was staged there before are done."""
        wrapped = self._next + n > self.capacity  # the ring's tail [_next, capacity) is skipped
        start = 0 if wrapped else self._next
        end = start + n
        # The stretches in use lie round the ring from the oldest to _next: those in the way go, oldest first.
        while self._in_use:
            first, last, done = self._in_use[0]
            if not (first < end and start < last or wrapped and first >= self._next):
                break
            done.synchronize()
            self._in_use.popleft()
        self._next = end
        return start


@dataclass
class PendingStep:
    """A launched step's sampled tokens (and logprobs) on their way to the host; rank 0 only."""

    step: int
    t0: float
    ids: torch.Tensor  # int32 [B], on the host once `done` has fired
    logprobs: torch.Tensor | None  # float32 [B], the sampled tokens' logprobs, if any row asked
    done: torch.cuda.Event | None
    tops: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # row -> (values, ids)
    input_logprobs: dict[int, tuple[list, list | None]] = field(default_factory=dict)
    grammars_done: list[GrammarDone] = field(default_factory=list)
    admit_errors: list[tuple[int, str]] = field(default_factory=list)
    accept_lens: np.ndarray | None = None  # a verify step's accepted drafts per request (int32)
    loads: list[tuple[int, torch.cuda.Event | None]] = field(default_factory=list)  # the host tier's, in flight
    wait_loads: bool = False  # a step of no requests: its answer waits for the loads (so the scheduler need not spin)

    def result(self) -> StepResult:
        """Wait for the copy (not for later steps) and build the answer to the scheduler."""
        if self.done is not None:
            self.done.synchronize()
        ids = self.ids.numpy().astype(np.int32, copy=False)
        lps = self.logprobs.numpy() if self.logprobs is not None else np.zeros(len(ids), np.float32)
        result = StepResult(step=self.step, next_ids=ids.tobytes(), next_logprobs=lps.astype(np.float32).tobytes(),
                            top_logprobs={i: list(zip(t_ids.tolist(), values.tolist()))
                                          for i, (values, t_ids) in self.tops.items()})
        for i, (lps_i, top) in self.input_logprobs.items():
            result.input_logprobs[i] = lps_i
            if top is not None:
                result.input_top_logprobs[i] = top
        result.forward_ms = (time.perf_counter() - self.t0) * 1000
        result.grammars_done = self.grammars_done
        result.admit_errors = self.admit_errors
        if self.accept_lens is not None:
            result.accept_lens = self.accept_lens.tobytes()
        if self.wait_loads:
            for _, done in self.loads:
                if done is not None:
                    done.synchronize()
        loads_done = [load for load, done in self.loads if done is None or done.query()]
        result.loads_done = np.asarray(loads_done, dtype=np.int32).tobytes() if loads_done else b""
        return result


class ResultCopier:
    """Starts the device-to-host copy of a step's sampled ids on a copy stream (CUDA) once they exist."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, ids: torch.Tensor, logprobs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                             torch.cuda.Event | None]:
        ids = ids.to(torch.int32)
        if self.stream is None:
            return ids, logprobs, None
        ready = torch.cuda.Event()
        ready.record()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            host_ids = torch.empty(ids.shape, dtype=torch.int32, pin_memory=True)
            host_ids.copy_(ids, non_blocking=True)
            ids.record_stream(self.stream)
            host_lps = None
            if logprobs is not None:
                host_lps = torch.empty(logprobs.shape, dtype=torch.float32, pin_memory=True)
                host_lps.copy_(logprobs, non_blocking=True)
                logprobs.record_stream(self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
        return host_ids, host_lps, done


@dataclass
class StepArrays:
    """One step's per-request and per-token host arrays (int32), in batch order (see StepBatch)."""

    req_slots: np.ndarray
    cached: np.ndarray
    extend: np.ndarray
    input_ids: np.ndarray
    out_slots: np.ndarray

    @classmethod
    def of(cls, b: StepBatch) -> StepArrays:
        return cls(from_i32(b.req_slots), from_i32(b.cached_lens), from_i32(b.extend_lens), from_i32(b.input_ids),
                   from_i32(b.out_slots))

    def padded(self, bs: int, pad_row: int, width: int = 1) -> StepArrays:
        """A batch of `bs` requests of `width` tokens each (a decode step: 1; a verify step of up to D drafts per
        request: D + 1), for a graph of that shape: each request's extend[i] <= width tokens, then width - extend[i]
        padding tokens (input id 0, K/V to PAD_SLOT) at the positions after them; then padding requests of `width`
        tokens from position 0 in req row `pad_row`, whose K/V go to PAD_SLOT (and which attend only to it)."""
        n = bs - len(self.req_slots)
        rows = padded_rows(self.extend, width)
        input_ids = np.zeros(bs * width, dtype=np.int32)
        input_ids[rows] = self.input_ids
        out_slots = np.full(bs * width, PAD_SLOT, dtype=np.int32)
        out_slots[rows] = self.out_slots
        return StepArrays(np.concatenate([self.req_slots, np.full(n, pad_row, np.int32)]),
                          np.concatenate([self.cached, np.zeros(n, np.int32)]), np.full(bs, width, np.int32),
                          input_ids, out_slots)


def padded_rows(extend: np.ndarray, width: int) -> np.ndarray:
    """The row of each token of requests of extend[i] <= width tokens once every request is padded to `width`
    tokens (request i's tokens at rows i * width ...), int64 [sum(extend)]."""
    extend = extend.astype(np.int64)
    starts = np.cumsum(extend) - extend
    return np.repeat(np.arange(len(extend), dtype=np.int64) * width - starts, extend) + np.arange(int(extend.sum()))
