"""A drafter's drafting of a verify step inside a CUDA graph, one graph per verify-graph size (verify_graphs.py),
replayed just before the target's verify graph: a draft costs the drafter's arithmetic, not its launches and index
uploads.

The graph works on the verify step as padded for its graph: G requests of W rows each, row r of request i holding
x_r (x_0 its last token, then its drafts; c_i = its cached length, x_r at position c_i + r). The drafter runs the
same G x R rows through every forward, row r at position c_i - lag + r:
- STANDALONE's draft model (lag 0, R = W, k + 1 forwards): row r is x_r's own KV entry;
- EAGLE3's head (lag 1, R = k = W - 1, k forwards): row r is its entry c_i - 1 + r, which reads x_r
  (eagle3_draft.py).
Forward j drafts x_{j+1} from row j into row j + 1 of the verify step (rows after j hold earlier drafts or the
step's placeholders then); the last forward has every row's input and writes every row's entry. One attention plan
serves all forwards: causal, R queries a request over its first c_i - lag + R entries, so row r sees entries up to
its own.

Invariants:
- Forward j recomputes the rows before j exactly as before (a matmul row and a causal attention row depend on their
  own inputs only, and theirs have not changed), so the entries they store again are the same.
- No entry a real row reads is ever wrong: a request drafting d_i < k tokens drafts on into its padding rows, whose
  entries land at columns the verify step padded to PAD_SLOT, or (EAGLE3) at x_{d_i}'s own slot, which the head
  rewrites from the target's states or the next step's first entry before anything reads it.
- Padding requests (cached 0) are treated as cached `lag`: their columns 0 .. R - 1 are all PAD_SLOT.
The rows' positions and entry slots and the attention plan are made before each replay, outside the graph (the
attention backends read out_slots as planned).
"""

from __future__ import annotations

import numpy as np
import torch

from worker_proc.attention import ForwardMeta


class DraftLoop:
    """A drafter's draft loop over a padded verify step: `plan` before each capture or replay, `run` captured (the
    drafter's `draft_rows`)."""

    def __init__(self, draft, max_bs: int, width: int, context_length: int, lag: int) -> None:
        self.draft, self.lag = draft, lag
        self.k, self.rows = width - 1, width - lag  # drafts a request, rows a request
        device = draft.device
        draft.attn.init_graphs(max_bs, max_bs * context_length)
        # The plan's device tensors stay at fixed addresses (a backend may read them from inside the graph).
        self.out_slots = torch.zeros(max_bs * self.rows, dtype=torch.int32, device=device)
        self.positions = torch.zeros(max_bs * self.rows, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.extend_lens = torch.full((max_bs,), self.rows, dtype=torch.int32, device=device)
        self.qo_indptr = torch.arange(0, (max_bs + 1) * self.rows, self.rows, dtype=torch.int32, device=device)
        self.cols = torch.arange(self.rows, dtype=torch.int32, device=device)

    def plan(self, d, cached: np.ndarray) -> None:
        """Before a capture or replay of `d` (the padded verify step on the device; `cached` its requests' cached
        lengths on the host): the rows' positions and entry slots, and the drafter's attention plan."""
        bs, n, lag = len(cached), self.rows, self.lag
        first = d.positions.view(bs, self.k + 1)[:, 0].clamp(min=lag) - lag  # the first row's position
        positions = (first[:, None] + self.cols[None, :]).reshape(-1)
        req_rows = d.req_slots.long()[:, None].expand(bs, n).reshape(-1)
        self.positions[:bs * n].copy_(positions)
        self.out_slots[:bs * n].copy_(d.meta.req_to_token[req_rows, positions.long()])
        self.seq_lens[:bs].copy_(first + n)
        meta = ForwardMeta(is_decode=False, req_slots=d.req_slots, seq_lens=self.seq_lens[:bs],
                           extend_lens=self.extend_lens[:bs], qo_indptr=self.qo_indptr[:bs + 1],
                           out_slots=self.out_slots[:bs * n], req_to_token=d.meta.req_to_token,
                           seq_lens_cpu=(np.maximum(cached, lag) - lag + n).tolist(), extend_lens_cpu=[n] * bs)
        self.draft.prepare(meta, graph=True)

    def run(self, d, bs: int) -> None:
        """What the graph captures: the drafter's forwards, its drafts into the verify step's input ids."""
        self.draft.draft_rows(d.input_ids.view(bs, self.k + 1), self.positions[:bs * self.rows], d.req_slots,
                              self.k)
