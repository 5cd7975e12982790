"""Batched sampling: greedy, temperature, top-k, top-p, min-p, and per-request seeds.

A seeded request draws its noise from a generator seeded by (seed, output index), so its
tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GREEDY_EPS = 1e-5


@dataclass
class SamplingBatch:
    """Per-row parameters (host arrays) of one step's sampled rows."""

    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    min_p: np.ndarray
    seed: np.ndarray  # -1: unseeded
    offset: np.ndarray  # output-token index being sampled
    banned: list[tuple[int, np.ndarray]]  # (row, token ids) masked out (min_new_tokens)

    @property
    def all_greedy(self) -> bool:
        return bool(((self.temperature < GREEDY_EPS) | (self.top_k == 1)).all())


def sample(logits: torch.Tensor, sb: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (token ids [B] int64, log-probabilities [B, V] of the model)."""
    for row, ids in sb.banned:
        logits[row, torch.from_numpy(ids).to(logits.device, torch.long)] = float("-inf")
    logprobs = torch.log_softmax(logits, dim=-1)
    if sb.all_greedy:
        return logits.argmax(dim=-1), logprobs
    device = logits.device
    greedy = torch.from_numpy((sb.temperature < GREEDY_EPS) | (sb.top_k == 1)).to(device)
    temp = torch.from_numpy(np.maximum(sb.temperature, GREEDY_EPS).astype(np.float32)).to(device)
    probs = torch.softmax(logits / temp[:, None], dim=-1)
    probs = _filter(probs, sb)
    noise = _exponential_noise(probs.shape, sb, device)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled), logprobs


def _filter(probs: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Zero out tokens outside top-k, outside the top-p nucleus, or below min_p * max."""
    need_sort = (sb.top_k > 0).any() or (sb.top_p < 1.0).any()
    device = probs.device
    if need_sort:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=device)[None, :]
        top_k = torch.from_numpy(np.where(sb.top_k > 0, sb.top_k, probs.shape[-1])).to(device)
        top_p = torch.from_numpy(sb.top_p.astype(np.float32)).to(device)
        # Keep a token if it is within top-k and the mass before it is below top_p (the first always stays).
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        keep = (rank < top_k[:, None]) & (mass_before < top_p[:, None])
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if (sb.min_p > 0).any():
        min_p = torch.from_numpy(sb.min_p.astype(np.float32)).to(device)
        probs = probs * (probs >= probs.max(dim=-1, keepdim=True).values * min_p[:, None])
    return probs


def _exponential_noise(shape: torch.Size, sb: SamplingBatch, device: torch.device) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1) draws from p; seeded rows get reproducible E."""
    noise = torch.empty(shape, device=device).exponential_()
    for row in np.flatnonzero(sb.seed >= 0):
        gen = torch.Generator(device=device)
        gen.manual_seed(_mix(int(sb.seed[row]), int(sb.offset[row])))
        noise[row] = torch.empty(shape[-1], device=device).exponential_(generator=gen)
    return noise


def _mix(seed: int, offset: int) -> int:
    """A 63-bit hash of (seed, offset) (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + offset + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) of one row."""
    values, ids = logprobs.topk(k)
    return list(zip(ids.tolist(), values.tolist()))
