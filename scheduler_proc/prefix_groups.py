"""Shared-prefix groups of a decode batch, for cascade attention: requests whose contexts begin with the same
KV slots (a prefix they matched in the radix cache) can attend to that prefix once per group instead of once
per request; the workers then read its KV once (`worker_proc/attention/flashinfer_backend.py`).

A batch's groups are (size, shared_len) pairs covering its requests in batch order; a lone request is a group
of one whose "shared" part is its whole cached context. Invariant, for every group: all its requests' rows of
req_to_token are equal in columns [0, shared_len), and 1 <= shared_len <= every member's cached_len (so the
token being decoded, at cached_len, is never in the shared part).
"""

from __future__ import annotations

import numpy as np

from scheduler_proc.request import Req

MIN_SHARED_LEN = 128  # a shorter common prefix is not worth its own attention pass
MIN_SAVED_READS = 16384  # KV token reads per layer a step must save over plain decode to use the cascade


class PrefixGrouper:
    """Groups a decode batch; the common-prefix length of a set of running requests is computed once."""

    def __init__(self) -> None:
        self._shared: dict[tuple[str, ...], int] = {}

    def groups(self, req_to_token: np.ndarray, batch: list[Req]) -> np.ndarray | None:
        """[G, 2] int32 (size, shared_len) in batch order, or None when sharing saves too little.

        `batch` must hold the requests that share token 0's KV slot side by side (the decode order).
        """
        first_slots = req_to_token[[r.req_slot for r in batch], 0]
        bounds = [0, *(np.flatnonzero(first_slots[1:] != first_slots[:-1]) + 1).tolist(), len(batch)]
        if len(bounds) == len(batch) + 1:  # no two requests share KV (the common case): nothing to group
            self._shared = {}
            return None
        shared_runs: list[tuple[int, int, int]] = []  # (start, end, shared_len) of runs worth a group
        seen: dict[tuple[str, ...], int] = {}
        saved = 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end - start < 2:
                continue
            members = batch[start:end]
            key = tuple(r.rid for r in members)
            shared = seen[key] = self._shared.get(key) or common_prefix(req_to_token, members)
            if shared >= MIN_SHARED_LEN:
                shared_runs.append((start, end, shared))
                saved += (end - start - 1) * shared
        self._shared = seen  # only the current groups: a finished request's set is never seen again
        if saved < MIN_SAVED_READS:
            return None
        out: list[tuple[int, int]] = []
        done = 0
        for start, end, shared in shared_runs:
            out += [(1, r.cached_len) for r in batch[done:start]]
            out.append((end - start, shared))
            done = end
        out += [(1, r.cached_len) for r in batch[done:]]
        return np.asarray(out, dtype=np.int32)


def common_prefix(req_to_token: np.ndarray, members: list[Req]) -> int:
    """How many leading KV slots every member's row shares with the first's, within their cached contexts.

    It cannot grow later: past the shortest member's cached context come its own new slots.
    """
    limit = min(r.cached_len for r in members)
    rows = req_to_token[[r.req_slot for r in members], :limit]
    same = (rows == rows[0]).all(axis=0)
    return limit if same.all() else int(np.argmin(same))
