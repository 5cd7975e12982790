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
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from worker_proc.step_io import StepArrays

log = logging.getLogger("radixserve.worker")

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


def capture_graphs(runner) -> DecodeGraphs | None:
    """A ModelRunner's graphs (None where they do not run: not CUDA, --disable-cuda-graph, a backend without)."""
    args = runner.args
    if runner.device.type != "cuda" or args.disable_cuda_graph or not runner.attn.supports_cuda_graph:
        return None
    sizes = capture_sizes(min(args.cuda_graph_max_bs, args.max_running_requests))
    if not sizes:
        return None
    t0 = time.monotonic()
    runner.attn.init_graphs(sizes[-1], sizes[-1] * runner.context_length)
    spec = args.speculative_algorithm is not None
    keys = graph_keys(sizes, runner.use_cascade, args.speculative_num_draft_tokens if spec else None,
                      args.speculative_batch_size_threshold)
    graphs = capture_keys(runner, keys, DecodeGraphs)
    log.info("rank %d captured decode CUDA graphs for batch sizes %s, verify graphs at %s%s, in %.1f s",
             runner.rank, sizes, sorted(bs for bs, width, _ in keys if width > 1),
             " (with the drafter's)" if runner.draft_loop is not None else "", time.monotonic() - t0)
    return graphs


def capture_keys(runner, keys: list[tuple[int, int, bool]], graphs_class: type[DecodeGraphs]) -> DecodeGraphs:
    """The graph of each (batch size, width, cascade) key of `runner`, in a `graphs_class`; beside each verify graph
    the drafter's draft loop (draft_graphs.py), in runner.draft_graphs."""
    graphs = graphs_class()
    verify = [(bs, width) for bs, width, _ in keys if width > 1]
    runner.draft_loop = runner.draft.draft_loop(max(verify)[0], verify[0][1], runner.context_length) \
        if runner.draft is not None and verify else None
    runner.draft_graphs = graphs_class() if runner.draft_loop is not None else None
    empty = StepArrays(*(np.zeros(0, np.int32) for _ in range(5)))
    with torch.inference_mode():
        for bs, width, cascade in keys:
            groups = np.zeros((0, 2), np.int32) if cascade else None
            d = runner._to_device(empty.padded(bs, runner.pad_row, width), is_decode=width == 1, prefix_groups=groups)
            runner.attn.prepare_graph(d.meta)
            graphs.capture(bs, lambda d=d: runner._graph_forward(d), cascade=cascade, width=width)
            if runner.draft_loop is not None and width > 1:
                runner.draft_loop.plan(d, np.zeros(bs, np.int32))
                runner.draft_graphs.capture(bs, lambda d=d, bs=bs: runner.draft_loop.run(d, bs), width=width)
    return graphs
