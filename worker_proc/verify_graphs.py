"""CUDA graphs of verify steps (speculative decoding: StepBatch.draft_lens, worker_proc/speculative.py).

A verify step of B requests runs the graph of the smallest batch size G >= B among the decode graphs' sizes up to
--speculative-batch-size-threshold (above it the scheduler sends plain decode steps), of width
W = --speculative-num-draft-tokens: every request is an extend of W tokens, its last token x_0, its d_i <= W - 1
drafts, then W - 1 - d_i padding tokens; the G - B padding requests have W tokens in the padding req row
(StepArrays.padded). The graph covers the target's forward from the embedding to the logits of all G * W rows;
attention is FlashInfer's prefill wrapper in graph mode, causal, planned outside the graph before each replay
(flashinfer_backend.py). The real rows' logits are picked after the replay (`padded_rows`).

Invariant (padding never reaches a real row): request i's padding tokens come after its d_i + 1 real ones, write
their K/V to PAD_SLOT and their block-table entries (PAD_SLOT) past the request's context, at columns
c_i + d_i + 1 .. c_i + W - 1, which every later step writes before it reads them (a step writes its new tokens'
entries first). Attention is causal within the request's W rows, aligned bottom-right over its c_i + W pages, so
real row j sees pages 0 .. c_i + j only, all real; rows after d_i are dropped. A step whose padding would pass the
context length (c_i + W > context length) runs eagerly, as do batches larger than every verify graph.

A drafter (STANDALONE's draft model, EAGLE3's head) drafts in a graph of its own, replayed just before
(draft_graphs.py). Outside the graphs (eager): the drafters writing their KV after acceptance (`settle`, reading the
real rows' EAGLE3 target states), and acceptance and sampling (speculative.Verifier). Verify steps never carry
cascade prefix groups (the scheduler groups plain decode steps only), so they have no cascade graphs.
"""

from __future__ import annotations

import numpy as np
import torch

from worker_proc.step_io import StepArrays, padded_rows


def graph_verify(runner, a: StepArrays, drafts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A verify step's target forward through its graph (ModelRunner `runner`): float32 logits of every real row
    [sum(a.extend), V] and the batch's req slots on the device; the step's input ids (a draft model's drafts in
    place) in runner.step_input_ids. None where no graph takes the step (the caller runs it eagerly)."""
    graphs, width = runner.graphs, runner.args.speculative_num_draft_tokens
    bs = len(a.req_slots)
    graph_bs = graphs.padded_size(bs, width) if graphs is not None else None
    if graph_bs is None or int(a.extend.max()) > width or int(a.cached.max()) + width > runner.context_length:
        return None
    rows = runner.staging.upload(padded_rows(a.extend, width)).long()  # the real rows, request after request

    def draft_into(d) -> None:  # the drafter's drafts into the graph's input rows, through its own graph
        runner.draft_loop.plan(d, np.concatenate([a.cached, np.zeros(graph_bs - bs, np.int32)]))
        runner.draft_graphs.replay(graph_bs, width=width)

    fill = draft_into if runner.draft_loop is not None else None
    d, logits = runner.replay_graph(a, graph_bs, rows, width, fill=fill)
    runner.step_input_ids = d.input_ids[rows]
    return logits, d.req_slots[:bs]
