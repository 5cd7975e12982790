"""EAGLE3's drafting inside CUDA graphs: a verify step's k = W - 1 head forwards as one graph per verify-graph size
(verify_graphs.py), replayed before the target's verify graph, so a draft costs the head's arithmetic, not its
launches and index uploads.

The graph works on the verify step as padded for its graph: G requests of W rows each, row r of request i holding
x_r (x_0 its last token, then its drafts). The head runs k forwards over the same G x k rows; row r of request i is
the head's entry at position c_i - 1 + r (it reads x_r; c_i = the request's cached length, eagle3_draft.py).
Forward j drafts x_{j+1} from row j into row j + 1 of the verify step and gives row j + 1 its hidden state (row j's
output); rows after j hold zeros or earlier drafts then. One attention plan serves all k forwards: causal, k
queries a request over its first c_i + k - 1 entries, so row r sees entries 0 .. c_i - 1 + r.

Invariants:
- Forward j recomputes rows 0 .. j - 1 exactly as before (a matmul row and a causal attention row depend on their
  own inputs only, and theirs have not changed), so the entries they store again are the same.
- No entry a real row reads is ever wrong: row r stores at column c_i - 1 + r; a request drafting d_i < k tokens
  drafts on into its padding rows, which store at x_{d_i}'s own slot (rewritten from the target's states or by
  the next step's first entry before anything reads it) and past it at columns the verify step padded to PAD_SLOT.
- Padding requests (cached 0) are treated as cached 1: their columns 0 .. k - 1 are all PAD_SLOT.
The plan and the rows' entry slots and positions are computed before each replay, outside the graph (the attention
backends read out_slots as planned).
"""

from __future__ import annotations

import numpy as np
import torch

from worker_proc.attention import ForwardMeta


class HeadDraftGraphs:
    """The head's draft loop over a padded verify step: `plan` before the replay, `draft_rows` captured."""

    def __init__(self, draft, max_bs: int, width: int, context_length: int) -> None:
        self.draft, self.k = draft, width - 1
        device = draft.device
        draft.attn.init_graphs(max_bs, max_bs * context_length)
        self.out_slots = torch.zeros(max_bs * self.k, dtype=torch.int32, device=device)
        self.positions = torch.zeros(max_bs * self.k, dtype=torch.int32, device=device)
        self.cols = torch.arange(self.k, dtype=torch.int32, device=device)

    def plan(self, d, cached: np.ndarray) -> None:
        """Before a capture or replay of `d` (the padded verify step on the device; `cached` its requests' cached
        lengths on the host): the rows' positions and entry slots, and the head's attention plan."""
        bs, k = len(cached), self.k
        first = d.positions.view(bs, k + 1)[:, 0].clamp(min=1)  # c_i (1 for padding requests)
        positions = (first[:, None] - 1 + self.cols[None, :]).reshape(-1)
        req_rows = d.req_slots.long()[:, None].expand(bs, k).reshape(-1)
        self.positions[:bs * k].copy_(positions)
        self.out_slots[:bs * k].copy_(d.meta.req_to_token[req_rows, positions.long()])
        dev = d.positions.device
        meta = ForwardMeta(is_decode=False, req_slots=d.req_slots, seq_lens=(first + k - 1).int(),
                           extend_lens=torch.full((bs,), k, dtype=torch.int32, device=dev),
                           qo_indptr=torch.arange(0, bs * k + 1, k, dtype=torch.int32, device=dev),
                           out_slots=self.out_slots[:bs * k], req_to_token=d.meta.req_to_token,
                           seq_lens_cpu=(np.maximum(cached, 1) + k - 1).tolist(), extend_lens_cpu=[k] * bs)
        self.draft.prepare(meta, graph=True)

    def draft_rows(self, d, bs: int) -> None:
        """What the graph captures: the k forwards, each draft into the verify step's input ids (d.input_ids)."""
        k, head, draft = self.k, self.draft.model, self.draft
        ids = d.input_ids.view(bs, k + 1)
        positions = self.positions[:bs * k]
        hidden = torch.zeros(bs, k, head.hidden_size, dtype=draft.dtype, device=draft.device)
        hidden[:, 0] = head.from_target(draft.pend[d.req_slots.long()])
        for j in range(k):
            normed, nxt = head(ids[:, :k].reshape(-1), positions, hidden.view(bs * k, -1), draft.attn, draft.embed,
                               False)
            ids[:, j + 1] = head.draft_tokens(normed.view(bs, k, -1)[:, j]).to(ids.dtype)
            if j + 1 < k:
                hidden[:, j + 1] = nxt.view(bs, k, -1)[:, j]
