"""The host tier's KV pool of one TP rank (--enable-hierarchical-cache) and the copies between it and the device
pool, started in the order each step's `kv_moves` lists them (scheduler_proc/host_tier.py decides them), before its
forward.

The pool has the device pool's layout, per layer K and V rows [num_slots, kv_heads_local, head_dim] (an FP8 cache as
its bytes), in host memory, pinned on CUDA. A move's host slots come in runs of consecutive slots (a request's KV,
allocated together) and scattered ones: a run of at least MIN_RUN slots crosses between device and host straight
from or into its slice of the pinned pool, one copy per layer and no pass of the CPU over its bytes; the scattered
rows go through a pinned staging tensor that the CPU gathers or scatters.
- Each step's slot indices go to the device in one upload through a pinned ring on the compute stream (HostStaging:
  a pageable copy would wait for the forward in flight).
- device to host: the rows are gathered on the compute stream (after the forwards that wrote them, before any later
  forward that overwrites those slots, which the scheduler may hand out at once) and cross on the store stream,
  which waits for that gather only. A run lands in the pool with its copy; scattered rows land once their copy is
  done (`finish_stores`, in order). The last store to a host slot wins: stores still on their way to any of a new
  store's host slots land before it starts.
- host to device (a load): the load stream waits for the store stream (a run's copy into the pool is done before a
  load reads it) and for what the compute stream has launched so far (a slot it fills may have been theirs); its
  scattered rows are first gathered by the CPU, after the stores that write them landed (waiting for their copies if
  need be); the rows cross on the load stream and are scattered into the device pool there, beside the later
  forwards: the compute stream waits for the load (`wait`) only in the step that names it in `load_waits`, the first
  that may read or reuse its slots (the scheduler admits the request that asked for them once rank 0 reported the
  load done: `loads_in_flight`, PendingStep.loads). Nothing waits for a store but a load of what it wrote.
On the CPU both pools are in host memory and a copy is done as it returns (no streams; a load's event is None): each
move goes straight from one pool to the other, layer by layer (`copy_rows`), with no staging tensor, since there a
copy costs what its passes over memory cost, on the step path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from radixserve.wire import KVMove, from_i32
from worker_proc.step_io import HostStaging

MIN_RUN = 16  # rows: a shorter run of consecutive slots goes with the scattered rows' indexed copy
MOVE_INDEX_INTS = 1 << 18  # the ring for slot indices (a step's larger upload is a plain copy, which waits)


class _Plan(NamedTuple):
    """A move's copies on CUDA: runs_of its host slots, and on the device its slots there and its scattered rows."""

    runs: list[tuple[int, int]]
    rest: np.ndarray
    device_slots: torch.Tensor
    device_rest: torch.Tensor


class HostPool:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        """`dtype`: the device pool's rows as moved (an FP8 cache's bytes: uint8)."""
        self.device = device
        cuda = device.type == "cuda"
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, pin_memory=cuda) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, pin_memory=cuda) for _ in range(num_layers)]
        self._rows = (*self.k, *self.v)
        self._store_stream = torch.cuda.Stream(device) if cuda else None
        self._load_stream = torch.cuda.Stream(device) if cuda else None
        self._indices = HostStaging(device, MOVE_INDEX_INTS) if cuda else None  # each step's slot indices (_plans)
        # Stores on their way, oldest first: (their copies done; their scattered rows in host memory, None where all
        # went straight into the pool; those rows' host slots; all the host slots they write).
        self._stores: deque[tuple[torch.cuda.Event, torch.Tensor | None, torch.Tensor, torch.Tensor]] = deque()
        self._loads: dict[int, torch.cuda.Event | None] = {}  # load id -> its copy done (None: done), until waited

    def move(self, pools: tuple[torch.Tensor, ...], moves: list[KVMove]) -> None:
        """Make `moves` between the device pool's rows `pools` (every layer's K, then V) and this pool, in order."""
        slots = [(torch.from_numpy(np.asarray(from_i32(m.src), dtype=np.int64)),
                  torch.from_numpy(np.asarray(from_i32(m.dst), dtype=np.int64))) for m in moves]
        plans = self._plans(moves, slots) if self._store_stream is not None else [None] * len(moves)
        for m, (src, dst), plan in zip(moves, slots, plans, strict=True):
            if m.to_host:
                self._land_stores_to(dst, staged_only=True)  # (the store stream orders the runs' copies)
                self._store(pools, src, dst, plan)
            else:
                self._land_stores_to(src, staged_only=True)  # (the load stream waits for the runs' copies)
                self._loads[m.load] = self._load(pools, src, dst, plan)
        self.finish_stores(0)

    def _plans(self, moves: list[KVMove], slots: list[tuple[torch.Tensor, torch.Tensor]]) -> list[_Plan]:
        """CUDA: each move's runs of host slots and its scattered rows (`runs_of`), with its device slots (a store's
        sources, a load's destinations) and the positions of its scattered rows on the device (int64), all uploaded
        at once on the compute stream: through pinned buffers, so that the upload does not wait for the forward in
        flight (and the next step's launch behind it) as a pageable copy would."""
        runs = [runs_of(dst if m.to_host else src) for m, (src, dst) in zip(moves, slots, strict=True)]
        parts = [x for m, (src, dst), (_, rest) in zip(moves, slots, runs, strict=True)
                 for x in ((src if m.to_host else dst).numpy(), rest)]
        if not parts:
            return []
        views = self._indices.upload_parts(parts)
        for stream in (self._store_stream, self._load_stream):
            views[0].record_stream(stream)  # (their one storage) kept until the side streams have read it
        return [_Plan(r, rest, d_slots, d_rest)
                for (r, rest), d_slots, d_rest in zip(runs, views[0::2], views[1::2], strict=True)]

    def _land_stores_to(self, slots: torch.Tensor, staged_only: bool = False) -> None:
        """The stores on their way that write any of these host slots (`staged_only`: through their staging
        tensors) land, and the older ones (in order)."""
        needed = [i for i, (_, _, staged, stored) in enumerate(self._stores)
                  if torch.isin(staged if staged_only else stored, slots).any()]
        self.finish_stores(needed[-1] + 1 if needed else 0)

    def wait(self, loads: Sequence[int]) -> None:
        """The compute stream waits for these loads' copies (the step that may first read or reuse their slots)."""
        for load in loads:
            done = self._loads.pop(load)
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)

    def loads_in_flight(self) -> list[tuple[int, torch.cuda.Event | None]]:
        """The loads not waited for yet, with their copies' events, for rank 0 to report those done."""
        return list(self._loads.items())

    def finish_stores(self, first: int | None = None) -> None:
        """Write stores into the pool, oldest first: the `first` ones (all if None), waiting for their copies, then
        those whose copies are done."""
        left = len(self._stores) if first is None else first
        while self._stores:
            done, rows, scattered, _ = self._stores[0]
            if not done.query():
                if left <= 0:
                    return
                done.synchronize()
            left -= 1
            self._stores.popleft()
            if rows is not None:
                for pool, layer_rows in zip(self._rows, rows, strict=True):
                    pool.index_copy_(0, scattered, layer_rows)

    def _store(self, pools: tuple[torch.Tensor, ...], src: torch.Tensor, dst: torch.Tensor, plan: _Plan | None) -> None:
        """Start copying device slots `src` of every layer to host slots `dst`: on the CPU done as it returns; on CUDA
        the rows, gathered on the compute stream, cross on the store stream, a run of host slots into its slice of
        the pool, the scattered rows into a pinned tensor, and join the stores on their way (`finish_stores`)."""
        if plan is None:
            copy_rows(pools, src, self._rows, dst)
            return
        runs, rest, d_src, d_rest = plan
        rows = torch.empty((len(pools), len(src), *pools[0].shape[1:]), dtype=pools[0].dtype, device=self.device)
        for layer, out in zip(pools, rows, strict=True):
            torch.index_select(layer, 0, d_src, out=out)
        self._store_stream.wait_stream(torch.cuda.current_stream(self.device))  # the gather
        scattered = None
        with torch.cuda.stream(self._store_stream):
            copy_runs(rows, torch.arange(len(dst)), self._rows, dst, runs, non_blocking=True)
            if len(rest):
                picked = rows.index_select(1, d_rest)
                scattered = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
                scattered.copy_(picked, non_blocking=True)
        rows.record_stream(self._store_stream)  # the allocator keeps `rows` until the copies have read them
        done = torch.cuda.Event()
        done.record(self._store_stream)
        self._stores.append((done, scattered, dst[rest], dst))

    def _load(self, pools: tuple[torch.Tensor, ...], src: torch.Tensor, dst: torch.Tensor,
              plan: _Plan | None) -> torch.cuda.Event | None:
        """Copy host slots `src` of every layer to the device pool's slots `dst`: on the CPU done as it returns (None);
        on CUDA on the load stream, after the stores and what the compute stream has launched so far, a run of host
        slots straight from its slice of the pool, the scattered rows gathered into a pinned tensor first; the rows
        are scattered into the device pool there (the copy's event)."""
        if plan is None:
            copy_rows(self._rows, src, pools, dst)
            return None
        runs, rest, d_dst, d_rest = plan
        if len(rest):  # the CPU reads these rows: the runs' copies that wrote them are done first
            self._land_stores_to(src[rest])
            gathered = torch.empty((len(self._rows), len(rest), *self._rows[0].shape[1:]), dtype=self._rows[0].dtype,
                                   pin_memory=True)
            for pool, out in zip(self._rows, gathered, strict=True):
                torch.index_select(pool, 0, src[rest], out=out)
        self._load_stream.wait_stream(self._store_stream)  # the runs' stores are in the pool
        self._load_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._load_stream):  # the rows live on this stream only
            rows = torch.empty((len(self._rows), len(src), *self._rows[0].shape[1:]), dtype=self._rows[0].dtype,
                               device=self.device)
            copy_runs(self._rows, src, rows, torch.arange(len(src)), runs, non_blocking=True)
            if len(rest):
                rows.index_copy_(1, d_rest, gathered.to(self.device, non_blocking=True))
            for layer, layer_rows in zip(pools, rows, strict=True):
                layer.index_copy_(0, d_dst, layer_rows)
        done = torch.cuda.Event()
        done.record(self._load_stream)
        return done


def runs_of(*slot_lists: torch.Tensor) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The runs of at least MIN_RUN positions where every one of `slot_lists` counts up by one ((first position,
    length) each), and the positions outside them (int64, ascending)."""
    lists = [t.numpy() for t in slot_lists]
    breaks = np.zeros(len(lists[0]) - 1, dtype=bool) if len(lists[0]) else np.zeros(0, dtype=bool)
    for s in lists:
        breaks |= np.diff(s) != 1
    starts = np.flatnonzero(np.concatenate(([True], breaks))) if len(lists[0]) else np.zeros(0, dtype=np.int64)
    lengths = np.diff(starts, append=len(lists[0]))
    long = lengths >= MIN_RUN
    rest = np.flatnonzero(np.repeat(~long, lengths))
    return list(zip(starts[long].tolist(), lengths[long].tolist(), strict=True)), rest


def copy_rows(src_layers: Sequence[torch.Tensor], src: torch.Tensor, dst_layers: Sequence[torch.Tensor],
              dst: torch.Tensor) -> None:
    """`dst_layers[i][dst] = src_layers[i][src]` for every layer i, in host memory (`dst` holds distinct slots). The
    runs of at least MIN_RUN rows where both slot lists count up by one (a prompt's KV, allocated together) are copied
    as slices, a memcpy each; the other rows (decode tokens, allocated one per step) by one indexed copy per layer.
    No staging tensor: each byte is read once and written once. O(layers x runs) calls, runs <= len(src) / MIN_RUN."""
    runs, rest = runs_of(src, dst)
    rest_src, rest_dst = src[rest], dst[rest]
    copy_runs(src_layers, src, dst_layers, dst, runs)
    if len(rest_src):
        for a, b in zip(src_layers, dst_layers, strict=True):
            b.index_copy_(0, rest_dst, a.index_select(0, rest_src))


def copy_runs(src_layers: Sequence[torch.Tensor], src: torch.Tensor, dst_layers: Sequence[torch.Tensor],
              dst: torch.Tensor, runs: list[tuple[int, int]], non_blocking: bool = False) -> None:
    """For each run (first, n) of `runs_of(src, dst)`, every layer's rows src[first] .. + n - 1 to its rows
    dst[first] .. + n - 1, a slice copy each (`non_blocking` between pinned host memory and a device)."""
    for first, n in runs:
        s0, d0 = int(src[first]), int(dst[first])
        for a, b in zip(src_layers, dst_layers, strict=True):
            b[d0:d0 + n].copy_(a[s0:s0 + n], non_blocking=non_blocking)
