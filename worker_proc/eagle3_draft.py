"""EAGLE3's drafter (models/eagle3.py's head), behind draft_model.py's interface.

The head's entry at position p reads the token x_{p+1} and the target's hidden state h_p (its three captured
layers, through fc), and predicts x_{p+2}. So the head lags the target by one position: after each target forward
the head writes its entries for the positions before the step's last row, and the last row's h (`pend`, one per
req slot, worker state like `last_sampled`) waits for its token, the first of the next step.

- prefill chunk or decode step (`follow`): entries c - 1 (from pend) .. c + e - 2, tokens x_c .. x_{c+e-1};
- verify step (`propose`): forward 0 writes entry c - 1 (x_0 = x_c with pend) and drafts x_1 from it; forward j
  (j >= 1) reads x_j with the head's own previous output as its hidden state, at position c + j - 1, and drafts
  x_{j+1}. Those entries c .. c + k - 2 hold the head's own states; `settle` rewrites the a accepted ones
  (entries c .. c + a - 1, tokens x_1 .. x_a) from the target's states, and the row of the token drawn after
  them becomes the new pend.

KV: the head's pool has an entry per KV slot of the target's, read through the same block table (draft_model.py).
A request admitted with a cached prefix of m tokens has no pend: entry m - 1 is what the request that computed
that prefix left there (right unless it ended on that very token); a wrong entry costs draft acceptance only,
never exactness.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from radixserve.config import ServerArgs
from radixserve.model_files import load_hf_config, resolve_model
from worker_proc.attention import ForwardMeta
from worker_proc.draft_graphs import DraftLoop
from worker_proc.drafter import Drafter
from worker_proc.models.eagle3 import Eagle3Head, capture_layers
from worker_proc.weights import init_dummy_weights, iter_safetensors


class Eagle3Draft(Drafter):
    def __init__(self, args: ServerArgs, dtype: torch.dtype, device: torch.device, target: torch.nn.Module) -> None:
        path = resolve_model(args.speculative_draft_model_path, args.download_dir)
        config = load_hf_config(path)
        decoder = target.model
        what = f"--speculative-draft-model-path {args.speculative_draft_model_path}"
        if not hasattr(decoder, "capture"):
            raise ValueError(f"EAGLE3 needs a Llama-family target (decoder layers with a residual stream), not "
                             f"{type(target).__name__}")
        target_hidden = decoder.embed_tokens.weight.shape[1]
        head_target = getattr(config, "target_hidden_size", None) or config.hidden_size
        if head_target != target_hidden:
            raise ValueError(f"{what}: an EAGLE-3 head for hidden size {head_target}, the target's is "
                             f"{target_hidden}")
        if config.vocab_size != target.vocab_size:
            raise ValueError(f"{what}: an EAGLE-3 head for a vocabulary of {config.vocab_size} tokens, the "
                             f"target's has {target.vocab_size}")
        self.model = Eagle3Head(config, dtype, device)
        if (args.speculative_draft_load_format or args.load_format) == "dummy":
            init_dummy_weights(self.model, args.random_seed)
        else:
            with torch.no_grad():
                self.model.load_weights(iter_safetensors(path))
        self.model.eval()
        decoder.capture = capture_layers(config, target.num_layers)
        self.decoder, self.embed = decoder, decoder.embed_tokens
        self.dtype, self.device = dtype, device
        self.pend = torch.zeros(args.max_running_requests + 1, 3 * target_hidden, dtype=dtype, device=device)
        self.has_pend = np.zeros(args.max_running_requests + 1, dtype=bool)

    def admit(self, req_slots: np.ndarray) -> None:
        self.has_pend[req_slots] = False

    def _entries(self, req_slots: np.ndarray, first: np.ndarray, count: np.ndarray, tokens: torch.Tensor,
                 token_rows: np.ndarray, hidden_rows: np.ndarray, pend_rows: np.ndarray, req_to_token: torch.Tensor,
                 states: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Write entries first[i] .. first[i] + count[i] - 1 of each request from tokens[token_rows] and
        hidden[hidden_rows], then make hidden[pend_rows[i]] request i's pend; hidden = `states(req slots on the
        device)`. One upload."""
        keep = count > 0
        meta, positions, (rows_t, rows_h, slots, pend_r) = ForwardMeta.for_positions(
            req_to_token, req_slots[keep], first[keep], count[keep], self.staging.upload,
            (token_rows, hidden_rows, req_slots, pend_rows))
        hidden = states(slots.long())
        if keep.any():
            self.prepare(meta)
            self.model(tokens[rows_t.long()], positions, hidden[rows_h.long()], self.attn, self.embed, True)
        self._set_pend(req_slots, slots, hidden[pend_r.long()])

    def _set_pend(self, req_slots: np.ndarray, d_slots: torch.Tensor, states: torch.Tensor) -> None:
        """Each request's pend: its row of `states` (d_slots: its req slot on the device)."""
        self.pend[d_slots.long()] = states
        self.has_pend[req_slots] = True

    @staticmethod
    def _flat(count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index of each entry within its request's, the request of each entry) for count[i] entries each."""
        starts = np.cumsum(count) - count
        return np.arange(int(count.sum())) - np.repeat(starts, count), np.repeat(np.arange(len(count)), count)

    def follow(self, a, d) -> None:
        """After a prefill chunk or decode step: entries c - 1 (where pend) .. c + e - 2; the last row's state is
        the new pend."""
        aux = self.decoder.aux
        extend, cached = a.extend.astype(np.int64), a.cached.astype(np.int64)
        starts = np.cumsum(extend) - extend
        pend = self.has_pend[a.req_slots]
        count = extend - 1 + pend
        within, req = self._flat(count)
        first = cached - pend
        # Entry k of request i is position first + k: token row starts + k + (1 - pend); its hidden state is the
        # pend (row T + i of [aux | pend]) for position c - 1, else aux row starts + (position - c).
        token_rows = starts[req] + within + 1 - pend[req]
        from_pend = pend[req] & (within == 0)
        hidden_rows = np.where(from_pend, len(aux) + req, starts[req] + within - pend[req])
        self._entries(a.req_slots, first, count, d.input_ids, token_rows, hidden_rows, starts + extend - 1,
                      d.meta.req_to_token, lambda slots: torch.cat([aux, self.pend[slots]]))

    def draft_loop(self, max_bs: int, width: int, context_length: int) -> DraftLoop:
        return DraftLoop(self, max_bs, width, context_length, lag=1)

    def draft_rows(self, ids: torch.Tensor, positions: torch.Tensor, req_slots: torch.Tensor, k: int) -> None:
        """DraftLoop's forwards (draft_graphs.py): rows 0 .. k - 1 of each request of `ids` [G, k + 1] are entries
        c - 1 .. c + k - 2 reading x_0 .. x_{k-1}; forward j drafts x_{j+1} from row j and hands row j + 1 its
        hidden state; row 0's is the target's (pend), the others' start at zero."""
        bs = len(ids)
        hidden = torch.zeros(bs, k, self.model.hidden_size, dtype=self.dtype, device=self.device)
        hidden[:, 0] = self.model.from_target(self.pend[req_slots.long()])
        for j in range(k):
            normed, nxt = self.model(ids[:, :k].reshape(-1), positions, hidden.view(bs * k, -1), self.attn,
                                     self.embed, False)
            ids[:, j + 1] = self.model.draft_tokens(normed.view(bs, k, -1)[:, j]).to(ids.dtype)
            if j + 1 < k:
                hidden[:, j + 1] = nxt.view(bs, k, -1)[:, j]

    def pass_over(self, a, d) -> None:
        """A decode step above the batch threshold: only the new pend (the step's target states, one row per
        request), so that the next entry the head writes reads the right state; entries c - 1 stay stale."""
        self._set_pend(a.req_slots, d.req_slots[:len(a.req_slots)], self.decoder.aux)

    def propose(self, a, drafts: np.ndarray, input_ids: torch.Tensor, req_to_token: torch.Tensor) -> None:
        """A verify step's drafts into its `input_ids` (rows: x_0, then drafts[i] placeholders)."""
        assert self.has_pend[a.req_slots].all(), "a decoding request has its last state"
        starts = np.cumsum(drafts + 1) - (drafts + 1)
        cached = a.cached.astype(np.int64)
        ones = np.ones(len(drafts), dtype=np.int64)
        hidden, from_target = None, True
        live = np.arange(len(drafts))
        for j in range(max(int(drafts.max(initial=0)), 1)):  # none drafts: entry c - 1 still (settle reads it)
            more = np.flatnonzero(drafts[live] > j)  # requests with a draft x_{j+1}
            meta, positions, (rows, sel, *slots) = ForwardMeta.for_positions(
                req_to_token, a.req_slots[live], cached[live] + j - 1, ones[live], self.staging.upload,
                (starts[live] + j, more) + ((a.req_slots,) if j == 0 else ()))
            rows, sel = rows.long(), sel.long()
            if j == 0:
                hidden = self.pend[slots[0].long()]
            self.prepare(meta)
            normed, nxt_hidden = self.model(input_ids[rows], positions, hidden, self.attn, self.embed, from_target)
            input_ids[rows[sel] + 1] = self.model.draft_tokens(normed[sel]).to(input_ids.dtype)
            live, hidden, from_target = live[more], nxt_hidden[sel], False

    def settle(self, a, drafts: np.ndarray, accepted: np.ndarray, input_ids: torch.Tensor,
               req_to_token: torch.Tensor) -> None:
        """After acceptance: entries c .. c + a - 1 from the target's states (tokens x_1 .. x_a); the row of the
        token drawn after them is the new pend."""
        aux = self.decoder.aux
        starts = np.cumsum(drafts + 1) - (drafts + 1)
        within, req = self._flat(accepted)
        token_rows = starts[req] + within + 1
        hidden_rows = starts[req] + within
        self._entries(a.req_slots, a.cached.astype(np.int64), accepted, input_ids, token_rows, hidden_rows,
                      starts + accepted, req_to_token, lambda slots: aux)
