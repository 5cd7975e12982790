"""SGLang's penalties and logit bias, per req slot on the device (rank 0, which samples).

A request's penalties come once, in its NewReq (wire.Penalties); nothing is stored or computed for a request
without them, and a step with no penalized row costs one host-side array lookup. The counts of each slot's
output tokens live on the device ([slots, vocab] float32, allocated at start-up, before the KV pool is sized, so
that --mem-fraction-static's budget counts them) and grow by the step's sampled tokens, on the device, for rows
whose sample is kept (StepBatch.sample_offsets >= 0); a re-admitted request's counts are rebuilt from its
NewReq.output_ids.

On the logits of a penalized row, before anything else of sampling (SGLang's meaning; counts over the output
only): repetition divides a seen token's positive logit by the penalty and multiplies a negative one by it,
then frequency subtracts penalty x count and presence subtracts the penalty once a token was seen; logit
bias adds its value to its token.

Index and value arrays reach the device through the runner's pinned staging (a pageable copy would make the host
wait for the forward in flight, every step that has a penalized row), one upload per call.
"""

from __future__ import annotations

import numpy as np
import torch

from radixserve.wire import Penalties, from_i32
from worker_proc.sampling import float32_value
from worker_proc.step_io import HostStaging


class SlotPenalties:
    """Per req slot: whether it is penalized (host), its penalty values and output-token counts (device)."""

    def __init__(self, max_reqs: int, vocab_size: int, staging: HostStaging) -> None:
        self.vocab_size = vocab_size
        self.staging = staging
        self.device = device = staging.device
        self.counted = np.zeros(max_reqs, dtype=bool)  # has a frequency, presence or repetition penalty
        self.biased = np.zeros(max_reqs, dtype=bool)
        self.kinds = np.zeros((max_reqs, 3), dtype=bool)  # which of frequency, presence, repetition it has
        self.frequency = torch.zeros(max_reqs, dtype=torch.float32, device=device)
        self.presence = torch.zeros(max_reqs, dtype=torch.float32, device=device)
        self.repetition = torch.ones(max_reqs, dtype=torch.float32, device=device)
        self.counts = torch.zeros((max_reqs, vocab_size), dtype=torch.float32, device=device)  # output-token counts
        self.bias: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (token ids, values)

    def set(self, slot: int, p: Penalties | None, output_ids: bytes = b"") -> None:
        """The request entering `slot` (None: unpenalized); `output_ids`: what it output before (re-admission).
        ValueError, before anything is written, for values the kernels cannot take (ModelRunner._admit)."""
        if p is not None:
            for name, value in (("frequency_penalty", p.frequency), ("presence_penalty", p.presence)):
                float32_value(name, value)
            float32_value("repetition_penalty", p.repetition, positive=True)
            if not np.isfinite(np.frombuffer(p.bias_values, dtype=np.float32)).all():
                raise ValueError("logit_bias cannot be applied: a value is not finite as a float32")
        self.counted[slot] = p is not None and (p.frequency != 0 or p.presence != 0 or p.repetition != 1)
        self.biased[slot] = p is not None and bool(p.bias_ids)
        self.bias.pop(slot, None)
        if self.counted[slot]:
            self.kinds[slot] = (p.frequency != 0, p.presence != 0, p.repetition != 1)
            self.frequency[slot], self.presence[slot], self.repetition[slot] = p.frequency, p.presence, p.repetition
            self.counts[slot] = 0
            prior = from_i32(output_ids)
            prior = prior[prior < self.vocab_size]
            if len(prior):
                self.counts[slot].index_put_((self.staging.upload(prior).long(),),
                                             torch.ones(len(prior), device=self.device), accumulate=True)
        if self.biased[slot]:
            n = len(p.bias_ids) // 4
            both = self.staging.upload(np.concatenate([from_i32(p.bias_ids), np.frombuffer(p.bias_values, np.int32)]))
            self.bias[slot] = (both[:n].long(), both[n:].view(torch.float32))  # the values' bits, as float32

    def apply(self, logits: torch.Tensor, slots: np.ndarray, d_slots: torch.Tensor,
              prior: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Penalize and bias the rows of `logits` (one per batch row, req slots `slots`) in place. `prior`: (row,
        token id) pairs counted as output before that row beyond its slot's counts (a verify step's drafts)."""
        rows = np.flatnonzero(self.counted[slots])
        if len(rows):
            frequency, presence, repetition = self.kinds[slots[rows]].any(axis=0)  # only the kinds in use
            at = ids = np.zeros(0, dtype=np.int64)  # prior's (row among `rows`, token id) pairs
            if prior is not None:
                keep = np.isin(prior[0], rows)
                at, ids = np.searchsorted(rows, prior[0][keep]), prior[1][keep]
            d_rows, d_at, d_ids = self.staging.upload_parts([rows, at, ids])
            s = d_slots.index_select(0, d_rows).long()
            counts = self.counts.index_select(0, s)
            if len(at):
                counts.index_put_((d_at, d_ids), torch.ones(len(at), device=self.device), accumulate=True)
            seen = counts > 0
            x = logits.index_select(0, d_rows)
            if repetition:
                rep = self.repetition[s][:, None]
                x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
            if frequency:
                x = torch.addcmul(x, counts, -self.frequency[s][:, None])
            if presence:
                x = torch.addcmul(x, seen.float(), -self.presence[s][:, None])
            logits.index_copy_(0, d_rows, x)
        for row in np.flatnonzero(self.biased[slots]):
            ids, values = self.bias[int(slots[row])]
            logits[int(row), ids] += values

    def record(self, slots: np.ndarray, d_slots: torch.Tensor, next_ids: torch.Tensor, kept: np.ndarray) -> None:
        """Count the step's sampled tokens of penalized rows whose sample is kept (on the device)."""
        rows = np.flatnonzero(self.counted[slots] & kept)
        if len(rows):
            d_rows = self.staging.upload(rows).long()
            ones = torch.ones(len(rows), dtype=torch.float32, device=self.device)
            self.counts.index_put_((d_slots[d_rows].long(), next_ids[d_rows].long()), ones, accumulate=True)
