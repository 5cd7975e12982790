"""Drafts made in the workers: the draft model of --speculative-algorithm STANDALONE (a small model of the
target's vocabulary, run by the same workers, with its own KV tensors), and EAGLE3's head (eagle3_draft.py), both
behind one interface the ModelRunner calls: `admit` (requests entering req slots), `follow` (after the target's
forward of a prefill or decode step), `propose` (a verify step's drafts, before the target's forward), `settle`
(after the verify step's acceptance).

KV ownership: the scheduler owns the block tables, the workers own KV tensors. The draft's KV pool has one entry
per KV slot of the target's pool (`KVCache` of its own layers and heads) and is addressed through the same block
table: the token at req_to_token[r, p] has its target KV and its draft KV at that slot. The scheduler therefore
allocates and frees nothing for the draft, and the radix cache shares its KV with it.

Invariant: wherever the target's KV is written, the draft's is written too, for the same token — every step the
target computes, the draft computes over the same tokens (`follow`: prefill chunks, decode steps), and a verify
step's drafting writes the draft KV of the last token and of every draft, the last draft included (`propose`
runs one forward past the k-th draft for it). So a radix hit, a chunked prefill or an accepted draft always finds
the draft's KV of its whole context; rejected drafts' slots go back to the allocator like the target's. The one
exception: decode steps above the batch threshold, which draft nothing and which the draft skips (drafter.py); the
draft's KV of their tokens is stale, which costs acceptance only.

Drafting is greedy (argmax of the draft's logits): the draft distribution is one-hot, which is what the verifier
(worker_proc/speculative.py) accepts exactly, for greedy and sampled requests alike.
"""

from __future__ import annotations

import numpy as np
import torch

from radixserve.config import ServerArgs
from radixserve.model_files import load_hf_config, resolve_model
from worker_proc.attention import ForwardMeta
from worker_proc.draft_graphs import DraftLoop
from worker_proc.drafter import Drafter
from worker_proc.eagle3_draft import Eagle3Draft
from worker_proc.weights import load_model


def make_draft(args: ServerArgs, dtype: torch.dtype, device: torch.device, target: torch.nn.Module) -> Drafter | None:
    """The drafter of --speculative-algorithm (None for those that draft in the scheduler)."""
    if args.speculative_algorithm == "STANDALONE":
        return DraftModel(args, dtype, device, target.vocab_size)
    if args.speculative_algorithm == "EAGLE3":
        return Eagle3Draft(args, dtype, device, target)
    return None


class DraftModel(Drafter):
    """STANDALONE: the draft model and its attention over its own KV pool."""

    def __init__(self, args: ServerArgs, dtype: torch.dtype, device: torch.device, target_vocab: int) -> None:
        path = resolve_model(args.speculative_draft_model_path, args.download_dir)
        config = load_hf_config(path)
        self.model = load_model(path, config, args.speculative_draft_load_format or args.load_format, dtype, device,
                                seed=args.random_seed)
        if self.model.vocab_size != target_vocab:
            raise ValueError(f"--speculative-draft-model-path {args.speculative_draft_model_path}: its vocabulary "
                             f"has {self.model.vocab_size} tokens, the target's {target_vocab} (they must be equal)")
        self.dtype, self.device = dtype, device

    def follow(self, a, d) -> None:
        """Write the draft KV of a prefill or decode step's tokens (StepArrays a, DeviceStep d)."""
        self.prepare(d.meta)
        self.model.forward(d.input_ids, d.positions, self.attn)

    def draft_loop(self, max_bs: int, width: int, context_length: int) -> DraftLoop:
        return DraftLoop(self, max_bs, width, context_length, lag=0)

    def draft_rows(self, ids: torch.Tensor, positions: torch.Tensor, req_slots: torch.Tensor, k: int) -> None:
        """DraftLoop's forwards (draft_graphs.py): rows x_0 .. x_k of each request of `ids` [G, k + 1], k + 1
        forwards, forward j drafting x_{j + 1} from row j; the last one writes the KV of every row."""
        bs = len(ids)
        for j in range(k + 1):
            hidden = self.model.forward(ids.reshape(-1), positions, self.attn)
            if j < k:
                nxt = self.model.compute_logits(hidden.view(bs, k + 1, -1)[:, j]).argmax(dim=-1)
                ids[:, j + 1] = nxt.to(ids.dtype)

    def propose(self, a, drafts: np.ndarray, input_ids: torch.Tensor, req_to_token: torch.Tensor) -> None:
        """A verify step's drafts, written into its `input_ids` in place: request i's rows are x_0 (its last token)
        then drafts[i] placeholders, at positions a.cached[i]...; forward j (one token per request that still
        drafts) reads x_j and writes x_{j+1} = argmax, and forward drafts[i] writes x_d's KV only."""
        starts = np.cumsum(drafts + 1) - (drafts + 1)
        ones = np.ones(len(drafts), dtype=np.int64)
        for j in range(int(drafts.max()) + 1):
            live = np.flatnonzero(drafts >= j)
            more = np.flatnonzero(drafts[live] > j)  # requests with a draft after x_j
            meta, positions, (rows, sel) = ForwardMeta.for_positions(
                req_to_token, a.req_slots[live], a.cached[live] + j, ones[live], self.staging.upload,
                (starts[live] + j, more))
            rows = rows.long()
            self.prepare(meta)
            hidden = self.model.forward(input_ids[rows], positions, self.attn)
            if len(more):
                nxt = self.model.compute_logits(hidden[sel.long()]).argmax(dim=-1)
                input_ids[rows[sel.long()] + 1] = nxt.to(input_ids.dtype)
