"""What makes a request one that can never run, checked once on arrival (Scheduler.add_request)."""

from __future__ import annotations

import numpy as np

from radixserve.wire import Penalties, SamplingParams


class RequestError(ValueError):
    """A request that can never run (too long, bad parameters); `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def token_array(ids: list[int], vocab_size: int) -> np.ndarray:
    """`ids` as int32, checked against [0, vocab_size) in one numpy pass; RequestError naming the bound if not."""
    try:
        arr = np.asarray(ids, dtype=np.int64)
    except OverflowError:  # beyond int64: out of range for certain
        arr = None
    if arr is None or (arr.size and (arr.min() < 0 or arr.max() >= vocab_size)):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        raise RequestError(f"token ids must be in [0, {vocab_size}); got {bad[:5]}")
    return arr.astype(np.int32)


def penalties_of(sp: SamplingParams, vocab_size: int) -> Penalties | None:
    """The request's penalties and logit bias for the workers (None without any); bias ids range-checked."""
    if not sp.penalized:
        return None
    ids = token_array([int(k) for k in sp.logit_bias], vocab_size)
    values = np.array(list(sp.logit_bias.values()), dtype=np.float32)
    return Penalties(sp.frequency_penalty, sp.presence_penalty, sp.repetition_penalty, ids.tobytes(),
                     values.tobytes())
