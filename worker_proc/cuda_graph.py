"""CUDA graphs of the decode forward (embedding through LM head) at a ladder of batch sizes.

A decode batch of B requests runs the graph of the smallest captured size >= B, padded with rows that
write the padding KV slot 0 and attend only to it. Attention metadata is planned outside the graph,
before each replay (FlashInfer's graph-mode wrappers keep their index buffers at fixed addresses);
sampling also stays outside. Graphs are captured largest first into one memory pool, so the smaller
ones reuse the larger one's activations (only one graph replays at a time).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

_LADDER = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def capture_sizes(max_bs: int) -> list[int]:
    """Batch sizes to capture, ascending: the ladder up to `max_bs`, then steps of 64, and `max_bs` itself."""
    if max_bs < 1:
        return []
    sizes = {s for s in _LADDER if s <= max_bs} | set(range(_LADDER[-1] + 64, max_bs + 1, 64))
    return sorted(sizes | {max_bs})


class DecodeGraphs:
    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.sizes: list[int] = []  # captured, ascending
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture(self, bs: int, fn: Callable[[], torch.Tensor], cascade: bool = False) -> None:
        """Capture `fn` (reading only tensors at fixed addresses) as the graph of batch size `bs` (its
        cascade-attention variant with `cascade`)."""
        # Warm up once outside the graph, so that lazy initialisation (cuBLAS handles, workspaces) is not captured.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self._graphs[bs, cascade] = (graph, out)
        if not cascade:
            bisect.insort(self.sizes, bs)

    def has(self, bs: int, cascade: bool) -> bool:
        return (bs, cascade) in self._graphs

    def padded_size(self, bs: int) -> int | None:
        """The captured size a batch of `bs` runs at, or None if it is larger than every graph."""
        i = bisect.bisect_left(self.sizes, bs)
        return self.sizes[i] if i < len(self.sizes) else None

    def replay(self, bs: int, cascade: bool = False) -> torch.Tensor:
        """Run the graph of size `bs`; returns its output tensor (overwritten by the next replay)."""
        graph, out = self._graphs[bs, cascade]
        graph.replay()
        return out
