"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Each request's parameters live in its req slot (`SlotParams`), written once at admission, on the
device for the kernels and on the host for the per-step choice of kernels: a step copies no sampling
parameters. Unseeded rows draw with FlashInfer's rejection-sampling kernels on CUDA (no sort over
batch x vocabulary) and with torch elsewhere. A seeded request draws its noise from a generator seeded
by (seed, output index), so its tokens do not depend on which other requests share the batch.
Log-softmax runs only when a row asks for logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from radixserve.wire import NewReq, from_i32
from worker_proc import cpu_kernels
from worker_proc.step_io import StepArrays

GREEDY_EPS = 1e-5


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) of logits [B, V]: for float32 on the CPU cpu_kernels' (the same ids), else torch's."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and \
            logits.stride(-1) == 1 and cpu_kernels.library() is not None:
        return cpu_kernels.argmax(logits)
    return logits.argmax(dim=-1)


def float32_value(name: str, value: float, positive: bool = False) -> float:
    """`value` rounded to the float32 a kernel reads; ValueError naming it if it is not finite there (or, with
    `positive`, not above zero)."""
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.float32(value)
    if not np.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} {value!r} cannot be applied: {v} as a float32")
    return float(v)


class SlotParams:
    """Sampling and logprob settings of the request in each req slot (set once at admission)."""

    def __init__(self, max_reqs: int, device: torch.device, default_seed: int = -1) -> None:
        """`default_seed` >= 0 (--enable-deterministic-inference: --random-seed) seeds every request that has no
        seed of its own, so it too draws from a generator of its own, as a seeded one does."""
        self.default_seed = default_seed
        self.temperature = np.ones(max_reqs, dtype=np.float32)
        self.top_p = np.ones(max_reqs, dtype=np.float32)
        self.top_k = np.full(max_reqs, -1, dtype=np.int64)
        self.min_p = np.zeros(max_reqs, dtype=np.float32)
        self.seed = np.full(max_reqs, -1, dtype=np.int64)
        self.min_new_tokens = np.zeros(max_reqs, dtype=np.int64)
        self.top_logprobs_num = np.zeros(max_reqs, dtype=np.int64)
        self.logprob_start = np.full(max_reqs, -1, dtype=np.int64)
        self.wants_logprob = np.zeros(max_reqs, dtype=bool)
        self.stop_ids: list[np.ndarray] = [np.zeros(0, np.int32)] * max_reqs
        self.prompt_ids: list[np.ndarray | None] = [None] * max_reqs
        # Device copies of what the kernels read, indexed by req slot.
        self.d_temperature = torch.ones(max_reqs, dtype=torch.float32, device=device)
        self.d_top_p = torch.ones(max_reqs, dtype=torch.float32, device=device)
        self.d_top_k = torch.zeros(max_reqs, dtype=torch.int32, device=device)  # 0: off
        self.d_min_p = torch.zeros(max_reqs, dtype=torch.float32, device=device)

    def set(self, nr: NewReq) -> None:
        """A request enters slot `nr.req_slot`: four scalar fills on the device, no host-to-device copy.
        ValueError, before anything is written, for values the kernels cannot take (ModelRunner._admit)."""
        s = nr.req_slot
        temperature, min_p = float32_value("temperature", nr.temperature), float32_value("min_p", nr.min_p)
        # A top_p below float32's range keeps the most likely token alone, as the float64 value means.
        top_p = max(float32_value("top_p", nr.top_p), float(np.finfo(np.float32).tiny))
        self.temperature[s], self.top_p[s], self.top_k[s] = temperature, top_p, nr.top_k
        self.min_p[s], self.min_new_tokens[s] = min_p, nr.min_new_tokens
        self.seed[s] = nr.seed if nr.seed >= 0 else self.default_seed
        self.stop_ids[s] = from_i32(nr.stop_ids)
        self.wants_logprob[s] = nr.logprob is not None
        self.top_logprobs_num[s] = nr.logprob.top_logprobs_num if nr.logprob else 0
        self.logprob_start[s] = nr.logprob.logprob_start_len if nr.logprob and nr.prompt_ids else -1
        self.prompt_ids[s] = from_i32(nr.prompt_ids) if nr.prompt_ids else None
        self.d_temperature[s] = max(temperature, GREEDY_EPS)
        self.d_top_p[s] = top_p
        self.d_top_k[s] = max(nr.top_k, 0)
        self.d_min_p[s] = min_p

    def banned(self, slots: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, token ids) to mask out: stop ids of rows still under their min_new_tokens."""
        rows, ids = [], []
        for row in np.flatnonzero(offsets < self.min_new_tokens[slots]):
            stop = self.stop_ids[slots[row]]
            rows.append(np.full(len(stop), row, np.int32))
            ids.append(stop)
        if not rows:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        return np.concatenate(rows), np.concatenate(ids).astype(np.int32)


@dataclass
class SampleRows:
    """One step's sampled rows: their req slots (host and device) and output indices (seeding)."""

    slots: np.ndarray
    d_slots: torch.Tensor
    offsets: np.ndarray


class Sampler:
    """Draws one token per row of a step's logits; subclasses swap the unseeded draw."""

    def __init__(self, params: SlotParams, device: torch.device, seed: int) -> None:
        self.p = params
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, rows: SampleRows) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [B, V] float32 (banned tokens already masked) -> (token ids [B] int64, the model's log-probs
        [B, V] if any row asks for logprobs, else None)."""
        p, slots = self.p, rows.slots
        logprobs = torch.log_softmax(logits, dim=-1) if p.wants_logprob[slots].any() else None
        greedy = (p.temperature[slots] < GREEDY_EPS) | (p.top_k[slots] == 1)
        if greedy.all():
            return argmax(logits), logprobs
        d = rows.d_slots.long()
        logits = logits / p.d_temperature[d][:, None]
        seeded = p.seed[slots] >= 0
        filters = (bool((p.top_k[slots] > 0).any()), bool((p.top_p[slots] < 1).any()), bool((p.min_p[slots] > 0).any()))
        if seeded.any():
            ids = self._race(logits, d, rows, seeded, filters)
        else:
            ids = self._draw(logits, d, filters)
        if greedy.any():  # the same rows, told apart on the device (no host-to-device copy)
            on_device = (p.d_temperature[d] <= GREEDY_EPS) | (p.d_top_k[d] == 1)
            ids = torch.where(on_device, argmax(logits), ids)
        return ids, logprobs

    def _draw(self, logits: torch.Tensor, d: torch.Tensor, filters: tuple[bool, bool, bool]) -> torch.Tensor:
        """Unseeded rows: the exponential race over the filtered distribution (torch)."""
        return self._race(logits, d, None, None, filters)

    def _race(self, logits: torch.Tensor, d: torch.Tensor, rows: SampleRows | None, seeded: np.ndarray | None,
              filters: tuple[bool, bool, bool]) -> torch.Tensor:
        """argmax(p / E), E ~ Exp(1), draws from p; seeded rows get reproducible E."""
        probs = self._filtered_probs(torch.softmax(logits, dim=-1), d, filters)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        if seeded is not None:
            for row in np.flatnonzero(seeded):
                gen = torch.Generator(device=self.device)
                gen.manual_seed(_mix(int(self.p.seed[rows.slots[row]]), int(rows.offsets[row])))
                noise[row] = torch.empty(probs.shape[-1], device=self.device).exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)

    def _filtered_probs(self, probs: torch.Tensor, d: torch.Tensor, filters: tuple[bool, bool, bool]) -> torch.Tensor:
        """Zero out tokens outside top-k, outside the top-p nucleus, or below min_p * max (unnormalised)."""
        use_k, use_p, use_min_p = filters
        if use_k or use_p:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
            top_k = self.p.d_top_k[d]
            top_k = torch.where(top_k > 0, top_k, probs.shape[-1])
            # Keep a token if it is within top-k and the mass before it is below top_p (the first always stays).
            mass_before = sorted_p.cumsum(dim=-1) - sorted_p
            keep = (rank < top_k[:, None]) & (mass_before < self.p.d_top_p[d][:, None])
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
        if use_min_p:
            probs = probs * (probs >= probs.max(dim=-1, keepdim=True).values * self.p.d_min_p[d][:, None])
        return probs


class FlashInferSampler(Sampler):
    """CUDA: FlashInfer's fused rejection-sampling kernels (no sort) for unseeded rows and for the top-k / top-p
    renormalisation of seeded ones."""

    def __init__(self, params: SlotParams, device: torch.device, seed: int) -> None:
        super().__init__(params, device, seed)
        import flashinfer.sampling

        self.fi = flashinfer.sampling

    def _draw(self, logits: torch.Tensor, d: torch.Tensor, filters: tuple[bool, bool, bool]) -> torch.Tensor:
        use_k, use_p, use_min_p = filters
        vocab = logits.shape[-1]
        top_k = torch.where(self.p.d_top_k[d] > 0, self.p.d_top_k[d], vocab)
        if not use_min_p:
            return self.fi.top_k_top_p_sampling_from_logits(logits, top_k, self.p.d_top_p[d],
                                                            filter_apply_order="joint",
                                                            generator=self.generator).long()
        probs = self._filtered_probs(torch.softmax(logits, dim=-1), d, (use_k, use_p, False))
        return self.fi.min_p_sampling_from_probs(probs, self.p.d_min_p[d], generator=self.generator).long()

    def _filtered_probs(self, probs: torch.Tensor, d: torch.Tensor, filters: tuple[bool, bool, bool]) -> torch.Tensor:
        use_k, use_p, use_min_p = filters
        if use_k:
            probs = self.fi.top_k_renorm_probs(probs, torch.where(self.p.d_top_k[d] > 0, self.p.d_top_k[d],
                                                                   probs.shape[-1]))
        if use_p:
            probs = self.fi.top_p_renorm_probs(probs, self.p.d_top_p[d])
        if use_min_p:
            probs = probs * (probs >= probs.max(dim=-1, keepdim=True).values * self.p.d_min_p[d][:, None])
        return probs


def make_sampler(params: SlotParams, device: torch.device, seed: int) -> Sampler:
    """FlashInfer's kernels on CUDA where the package is installed, torch otherwise."""
    if device.type == "cuda":
        try:
            return FlashInferSampler(params, device, seed)
        except ImportError:
            pass
    return Sampler(params, device, seed)


def _mix(seed: int, offset: int) -> int:
    """A 63-bit hash of (seed, offset) (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + offset + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) of one row (a host sync: only for rows that ask)."""
    values, ids = logprobs.topk(k)
    return list(zip(ids.tolist(), values.tolist()))


def prompt_logprobs(model, params: SlotParams, hidden: torch.Tensor,
                    a: StepArrays) -> dict[int, tuple[list, list | None]]:
    """Logprobs of the prompt tokens step `a` computed (`hidden`: their hidden states), of each request that asked
    for them (by its row in the step). The logprob of prompt token t comes from the hidden state at position t - 1."""
    out = {}
    starts = np.cumsum(a.extend) - a.extend  # first row of each request in `hidden`
    for i, s in enumerate(a.req_slots):
        prompt = params.prompt_ids[s]
        if prompt is None:
            continue
        cached, extend = int(a.cached[i]), int(a.extend[i])
        first = max(cached + 1, int(params.logprob_start[s]), 1)
        last = min(cached + extend, len(prompt) - 1)  # inclusive target index
        if first > last:
            out[i] = ([], None)
            continue
        rows = torch.arange(first - 1, last, device=hidden.device) - cached + int(starts[i])
        lps = torch.log_softmax(model.compute_logits(hidden[rows]), dim=-1)
        targets = torch.from_numpy(prompt[first:last + 1].astype(np.int64)).to(hidden.device)
        values = lps.gather(1, targets[:, None]).squeeze(1).tolist()
        k = int(params.top_logprobs_num[s])
        out[i] = (values, [top_logprobs(lps[j], k) for j in range(len(values))] if k > 0 else None)
    return out
