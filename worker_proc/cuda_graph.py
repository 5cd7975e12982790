"""CUDA graphs of the decode forward (embedding through LM head) at a ladder of batch sizes, and of verify steps.

A decode batch of B requests runs the graph of the smallest captured size >= B, padded with rows that
write the padding KV slot 0 and attend only to it. A verify step of speculative decoding (verify_graphs.py) runs
a graph of the same kind whose requests have `width` tokens each (its last token and its drafts, padded).
Attention metadata is planned outside the graph, before each replay (FlashInfer's graph-mode wrappers keep their
index buffers at fixed addresses); sampling also stays outside. Graphs are captured largest first into one memory
pool, so the smaller ones reuse the larger one's activations (only one graph replays at a time).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import torch

_LADDER = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def capture_sizes(max_bs: int) -> list[int]:
    """Batch sizes to capture, ascending: the ladder up to `max_bs`, then steps of 64, and `max_bs` itself."""
    if max_bs < 1:
        return []
    sizes = {s for s in _LADDER if s <= max_bs} | set(range(_LADDER[-1] + 64, max_bs + 1, 64))
    return sorted(sizes | {max_bs})


def graph_keys(decode_sizes: list[int], cascade: bool, verify_width: int | None,
               verify_threshold: int) -> list[tuple[int, int, bool]]:
    """(batch size, tokens per request, cascade) of each graph to capture, largest first: the decode graphs at
    `decode_sizes` (each with a cascade variant with `cascade`); with `verify_width`, verify graphs (verify_graphs.py)
    at the sizes that a verify step of at most `verify_threshold` requests is padded to: those below it and the
    first at or above it."""
    keys = [(bs, 1, c) for bs in decode_sizes for c in ((False, True) if cascade else (False,))]
    if verify_width is not None and verify_threshold >= 1:
        verify = decode_sizes[:bisect.bisect_left(decode_sizes, verify_threshold) + 1]
        keys += [(bs, verify_width, False) for bs in verify]
    return sorted(keys, key=lambda k: -k[0] * k[1])


class DecodeGraphs:
    """Captured graphs keyed by (batch size, tokens per request `width`, cascade attention); what a graph's
    function returned (its outputs, rewritten by each replay) comes back from `replay`."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self._sizes: dict[int, list[int]] = {}  # width -> batch sizes captured without cascade, ascending
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, Any]] = {}

    @property
    def sizes(self) -> list[int]:
        """The decode graphs' batch sizes, ascending."""
        return self.sizes_of(1)

    def sizes_of(self, width: int) -> list[int]:
        return self._sizes.get(width, [])

    def capture(self, bs: int, fn: Callable[[], Any], cascade: bool = False, width: int = 1) -> None:
        """Capture `fn` (reading only tensors at fixed addresses) as the graph of batch size `bs` and `width`
        tokens per request (its cascade-attention variant with `cascade`)."""
        # Warm up once outside the graph, so that lazy initialisation (cuBLAS handles, workspaces) is not captured.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self._graphs[bs, width, cascade] = (graph, out)
        if not cascade:
            bisect.insort(self._sizes.setdefault(width, []), bs)

    def has(self, bs: int, cascade: bool, width: int = 1) -> bool:
        return (bs, width, cascade) in self._graphs

    def padded_size(self, bs: int, width: int = 1) -> int | None:
        """The captured size a batch of `bs` runs at, or None if it is larger than every graph of `width`."""
        sizes = self.sizes_of(width)
        i = bisect.bisect_left(sizes, bs)
        return sizes[i] if i < len(sizes) else None

    def replay(self, bs: int, cascade: bool = False, width: int = 1) -> Any:
        """Run the graph of size `bs`; returns its outputs (overwritten by the next replay)."""
        graph, out = self._graphs[bs, width, cascade]
        graph.replay()
        return out
