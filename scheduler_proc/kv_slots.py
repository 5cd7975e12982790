"""KV slot allocator: hands out rows of the workers' KV tensors (see worker_proc/kv_cache.py).

Slot 0 is the padding slot and is never handed out, so usable slots are 1..num_slots-1.
"""

from __future__ import annotations

import numpy as np


class KVSlotAllocator:
    """A numpy-backed stack of free slots; alloc and free are vectorised, never a loop per slot.

    Invariant: `_stack[:_top]` holds exactly the free slots, each once, and `_is_free[s]` is True
    iff slot s is among them (`_is_free[0]` is always False).
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self._num_slots = num_slots
        # Popped from the top, so a fresh pool hands out 1, 2, 3, ... in order.
        self._stack = np.arange(num_slots - 1, 0, -1, dtype=np.int32)
        self._top = num_slots - 1
        self._is_free = np.ones(num_slots, dtype=bool)
        self._is_free[0] = False

    @property
    def capacity(self) -> int:
        return self._num_slots - 1

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def num_free(self) -> int:
        return self._top

    def alloc(self, n: int) -> np.ndarray | None:
        """n free slots as a fresh int32 array, or None if fewer than n are free (never partial)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self._top:
            return None
        out = self._stack[self._top - n:self._top][::-1].copy()
        self._top -= n
        self._is_free[out] = False
        return out

    def free(self, slots: np.ndarray) -> None:
        """Return slots to the pool; raises on an out-of-range slot or a slot that is already free.

        A slot repeated within one call is not checked here (it would cost a sort per call);
        check_invariants() catches it.
        """
        slots = np.asarray(slots, dtype=np.int32)
        n = slots.size
        if n == 0:
            return
        if slots.ndim != 1:
            raise ValueError(f"slots must be 1-D, got shape {slots.shape}")
        if slots.min() < 1 or slots.max() >= self._num_slots:
            raise ValueError(f"slot out of range 1..{self._num_slots - 1}")
        if self._is_free[slots].any():
            raise RuntimeError(f"double free of slots {slots[self._is_free[slots]].tolist()}")
        self._is_free[slots] = True
        self._stack[self._top:self._top + n] = slots
        self._top += n

    def free_slots(self) -> np.ndarray:
        """The free slots, sorted (a copy), for invariant checks."""
        return np.sort(self._stack[:self._top])

    def check_invariants(self) -> None:
        free = self.free_slots()
        assert free.size == np.unique(free).size, "a slot is on the free stack twice"
        assert free.size == 0 or (free[0] >= 1 and free[-1] < self._num_slots), "slot out of range"
        assert np.array_equal(free, np.flatnonzero(self._is_free)), "free mask disagrees with stack"
