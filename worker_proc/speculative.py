"""Verify steps of speculative decoding (StepBatch.draft_lens): the target's distribution at every drafted
position, exact acceptance, and the tokens kept.

A verify step computes request i's last token x_0 and its d_i drafts x_1..x_d in one extend over the paged KV
(causal within the draft), so its row j holds the logits of the token after x_j. Rank 0 shapes each row as a
plain step would once x_1..x_j were output: penalties count x_1..x_j too (`penalty_prior`), logit bias,
min_new_tokens' ban (row j samples output index sample_offsets[i] + j), a grammar's mask (a grammar request never
drafts: its one row is a plain decode), then temperature / top-k / top-p / min-p (`Sampler._filtered_probs`).

Acceptance, per request, in order: a greedy request accepts x_{j+1} while it is row j's argmax; a sampled one by
rejection sampling against the drafts' distribution, which for n-gram drafts is one-hot: x_{j+1} is accepted with
probability p_j(x_{j+1}), and at the first rejection the token is drawn from p_j without x_{j+1}, renormalised
(max(p - q, 0)); after d accepted drafts, the bonus token is drawn from p_d. Each emitted token is then distributed
exactly as without speculation (Leviathan et al., 2023; Chen et al., 2023). Seeded rows draw their uniforms and
noise from generators seeded by (seed, output index), as plain sampling does. On CUDA, FlashInfer's
`chain_speculative_sampling` does the unseeded sampled requests, grouped by draft length.

The host needs each request's accepted count to know which tokens it emits (a sync per verify step, where a plain
step has none: speculation already waits for each verify step's answer before drafting the next).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from radixserve.wire import StepBatch, from_i32
from worker_proc import parallel
from worker_proc.sampling import GREEDY_EPS, Sampler, _mix, argmax
from worker_proc.step_io import HostStaging, PendingStep
from worker_proc.verify_graphs import graph_verify


@dataclass
class VerifyRows:
    """A verify step's rows: per request its first row and draft count, per row its req slot and output index."""

    starts: np.ndarray  # [B] first row of each request
    drafts: np.ndarray  # [B] d_i
    row_slots: np.ndarray  # [T] req slot of each row
    row_offsets: np.ndarray  # [T] output index each row samples
    d_row_slots: torch.Tensor  # [T] row_slots on the device

    @classmethod
    def of(cls, req_slots: np.ndarray, offsets: np.ndarray, drafts: np.ndarray, staging: HostStaging) -> VerifyRows:
        extend = drafts + 1
        starts = np.cumsum(extend) - extend
        within = np.arange(int(extend.sum()), dtype=np.int64) - np.repeat(starts, extend)
        row_slots = np.repeat(req_slots, extend)
        return cls(starts, drafts, row_slots, np.repeat(offsets, extend) + within, staging.upload(row_slots))

    @property
    def num_rows(self) -> int:
        return len(self.row_slots)

    def has_draft(self) -> np.ndarray:
        """[T] whether row j of its request is followed by a draft x_{j+1} (j < d)."""
        within = np.arange(self.num_rows) - np.repeat(self.starts, self.drafts + 1)
        return within < np.repeat(self.drafts, self.drafts + 1)


def penalty_prior(rows: VerifyRows, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, token id) pairs: the drafts x_1..x_j that row j's penalties count as output (O(sum d^2))."""
    rs, ids = [], []
    for start, d in zip(rows.starts.tolist(), rows.drafts.tolist()):
        for j in range(1, d + 1):
            rs.append(np.full(j, start + j, np.int64))
            ids.append(input_ids[start + 1:start + j + 1].astype(np.int64))
    if not rs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rs), np.concatenate(ids)


@dataclass
class Verdict:
    """Per request: drafts accepted (host) and the token after them (device); per emitted token its row."""

    accepted: np.ndarray  # [B] a_i
    final: torch.Tensor  # [B] int64, the token drawn at row starts + a
    emitted_rows: np.ndarray  # [sum(a + 1)] the row whose distribution each emitted token comes from
    emitted: torch.Tensor  # [sum(a + 1)] int64: x_1..x_a, then the final token, per request


class Verifier:
    """Exact acceptance of a verify step's drafts, over the processed logits of all its rows. Its index arrays
    reach the device through `staging` (pinned: a pageable copy would make the host wait for the step's forward
    before the accepted counts are even computed), one upload per stage."""

    def __init__(self, sampler: Sampler, staging: HostStaging) -> None:
        self.sampler = sampler
        self.staging = staging
        self.p = sampler.p
        self.device = sampler.device
        self.fi = None
        if self.device.type == "cuda":
            try:
                import flashinfer.sampling

                self.fi = flashinfer.sampling
            except ImportError:
                pass

    def verify(self, logits: torch.Tensor, rows: VerifyRows, input_ids: torch.Tensor) -> Verdict:
        """logits [T, V] float32 (penalties, bias, bans and grammar masks applied); input_ids [T] the step's tokens
        (x_0..x_d per request) on the device."""
        p, slots = self.p, rows.row_slots
        greedy_req = ((p.temperature[slots] < GREEDY_EPS) | (p.top_k[slots] == 1))[rows.starts]
        # Leading accepts per request: rows of a [B, max d] matrix, padded with a row that is never ok.
        width = max(int(rows.drafts.max(initial=0)), 1)
        cols = np.arange(width)
        index = np.where(cols[None, :] < rows.drafts[:, None], rows.starts[:, None] + cols[None, :], rows.num_rows)
        has_draft, index_d, starts_d, sampled_rows = self.staging.upload_parts(
            [rows.has_draft(), index, rows.starts, np.repeat(~greedy_req, rows.drafts + 1)])
        next_tok = torch.roll(input_ids.long(), -1)  # row j's draft x_{j+1} (where has_draft)
        best = argmax(logits)
        ok = best == next_tok
        probs = gens = None
        uniform = None
        fi_reqs = np.zeros(len(rows.starts), dtype=bool)
        if not greedy_req.all():
            d = rows.d_row_slots.long()
            filters = (bool((p.top_k[slots] > 0).any()), bool((p.top_p[slots] < 1).any()),
                       bool((p.min_p[slots] > 0).any()))
            probs = self.sampler._filtered_probs(torch.softmax(logits / p.d_temperature[d][:, None], dim=-1), d,
                                                 filters)
            probs = probs / probs.sum(dim=-1, keepdim=True)
            seeded_req = p.seed[slots][rows.starts] >= 0
            if self.fi is not None:
                fi_reqs = ~greedy_req & ~seeded_req & (rows.drafts > 0)
            uniform, gens = self._uniform(rows, seeded_req)
            p_next = probs.gather(1, next_tok[:, None]).squeeze(1)
            ok = torch.where(sampled_rows.bool(), uniform < p_next, ok)
        ok = ok & has_draft.bool()
        padded = torch.cat([ok, ok.new_zeros(1)])
        accepted_d = padded[index_d].int().cumprod(dim=1).sum(dim=1)
        final_rows_d = starts_d + accepted_d
        final = best[final_rows_d]
        if probs is not None:
            final = self._draw_final(probs, rows, final_rows_d, accepted_d, next_tok, final, greedy_req, gens)
        accepted = accepted_d.cpu().numpy().astype(np.int64)
        if fi_reqs.any():
            self._flashinfer(probs, rows, input_ids, fi_reqs, accepted, final)
        return self._verdict(rows, accepted, final, input_ids)

    def _uniform(self, rows: VerifyRows, seeded_req: np.ndarray) -> tuple[torch.Tensor, dict[int, torch.Generator]]:
        """One uniform per row (the acceptance test); seeded requests' rows from a generator per row, seeded by
        (seed, output index), kept for the final draw at that row."""
        uniform = torch.rand(rows.num_rows, device=self.device, generator=self.sampler.generator)
        gens: dict[int, torch.Generator] = {}
        for i in np.flatnonzero(seeded_req):
            for r in range(int(rows.starts[i]), int(rows.starts[i] + rows.drafts[i]) + 1):
                gen = torch.Generator(device=self.device)
                gen.manual_seed(_mix(int(self.p.seed[rows.row_slots[r]]), int(rows.row_offsets[r])))
                uniform[r] = torch.rand(1, device=self.device, generator=gen)[0]
                gens[r] = gen
        return uniform, gens

    def _draw_final(self, probs: torch.Tensor, rows: VerifyRows, final_rows: torch.Tensor, accepted: torch.Tensor,
                    next_tok: torch.Tensor, greedy_final: torch.Tensor, greedy_req: np.ndarray,
                    gens: dict[int, torch.Generator]) -> torch.Tensor:
        """The token after the accepted drafts of sampled requests: from p without the rejected draft (its
        residual against a one-hot draft), or the bonus from p_d when every draft was accepted."""
        dist = probs[final_rows]
        drafts, greedy = self.staging.upload_parts([rows.drafts, greedy_req])
        rejected = accepted < drafts
        dist = torch.where(rejected[:, None] & (torch.arange(dist.shape[1], device=self.device)[None, :] ==
                                                next_tok[final_rows][:, None]), 0.0, dist)
        empty = dist.sum(dim=-1, keepdim=True) <= 0
        dist = torch.where(empty, probs[final_rows], dist)
        noise = torch.empty_like(dist).exponential_(generator=self.sampler.generator)
        if gens:
            final_host = final_rows.cpu().numpy()
            for i, r in enumerate(final_host.tolist()):
                if r in gens:
                    noise[i] = torch.empty(dist.shape[1], device=self.device).exponential_(generator=gens[r])
        drawn = (dist / noise).argmax(dim=-1)
        return torch.where(greedy.bool(), greedy_final, drawn)

    def _flashinfer(self, probs: torch.Tensor, rows: VerifyRows, input_ids: torch.Tensor, reqs: np.ndarray,
                    accepted: np.ndarray, final: torch.Tensor) -> None:
        """CUDA: FlashInfer's chain speculative sampling for unseeded sampled requests, one call per draft length
        (in place of the torch draw for them)."""
        vocab = probs.shape[1]
        for d in np.unique(rows.drafts[reqs]).tolist():
            group = np.flatnonzero(reqs & (rows.drafts == d))
            row_index, g = self.staging.upload_parts([rows.starts[group][:, None] + np.arange(d + 1)[None, :], group])
            target = probs[row_index]  # [b, d + 1, V]
            draft_ids = input_ids.long()[row_index[:, 1:]]  # [b, d]
            draft_probs = torch.zeros(len(group), d, vocab, device=self.device)
            draft_probs.scatter_(2, draft_ids[..., None], 1.0)
            out, _, emitted = self.fi.chain_speculative_sampling(draft_probs, draft_ids.int(), target,
                                                                 generator=self.sampler.generator)
            emitted_host = emitted.cpu().numpy().astype(np.int64)
            accepted[group] = emitted_host
            final[g] = out.long().gather(1, emitted.long()[:, None]).squeeze(1)

    def _verdict(self, rows: VerifyRows, accepted: np.ndarray, final: torch.Tensor,
                 input_ids: torch.Tensor) -> Verdict:
        counts = accepted + 1
        firsts = np.cumsum(counts) - counts
        within = np.arange(int(counts.sum())) - np.repeat(firsts, counts)
        emitted_rows = np.repeat(rows.starts, counts) + within
        is_final = within == np.repeat(accepted, counts)
        # A kept draft x_{j+1} is the input at row j + 1; the final token comes from `final`.
        draft_src, final_pos = self.staging.upload_parts([np.minimum(emitted_rows + 1, rows.num_rows - 1),
                                                          np.flatnonzero(is_final)])
        emitted = input_ids.long()[draft_src]
        emitted[final_pos] = final
        return Verdict(accepted, final, emitted_rows, emitted)


def launch_verify(runner, b: StepBatch, a, t0: float, admit_errors: list[tuple[int, str]]) -> PendingStep | None:
    """ModelRunner.launch for a verify step: every row's logits, exact acceptance on rank 0, and the tokens each
    request emits (accepted drafts, then one drawn) as a flat PendingStep with its accepted counts."""
    drafts = from_i32(b.draft_lens).astype(np.int64)
    verified = graph_verify(runner, a, drafts)  # None: no verify graph takes this step
    if verified is None:
        logits, _, slots = runner.forward(a, False, None, every_token=True, drafts=drafts)
    else:
        logits, slots = verified
    rows = VerifyRows.of(a.req_slots, from_i32(b.sample_offsets).astype(np.int64), drafts, runner.staging)
    input_ids = runner.step_input_ids  # with a draft model, its drafts in place of the scheduler's PENDING
    final = verdict = accepted_d = None
    if runner.rank == 0:
        kept = np.ones(rows.num_rows, dtype=bool)
        prior = None
        if runner.penalties.counted[a.req_slots].any():
            prior = penalty_prior(rows, a.input_ids if runner.draft is None else input_ids.cpu().numpy())
        runner._process_logits(logits, rows.row_slots, rows.d_row_slots, rows.row_offsets, kept, prior)
        verdict = runner.verifier.verify(logits, rows, input_ids)
        emitted_slots = rows.row_slots[verdict.emitted_rows]
        emitted_rows_d, accepted_d = runner.staging.upload_parts([verdict.emitted_rows, verdict.accepted])
        d_emitted = rows.d_row_slots[emitted_rows_d]
        runner._follow_output(emitted_slots, d_emitted, verdict.emitted, np.ones(len(emitted_slots), dtype=bool))
        final = verdict.final
    final = parallel.tp_broadcast(final, (len(a.req_slots),), torch.int64, runner.device)
    runner.last_sampled[slots.long()] = final.to(torch.int32)
    if runner.draft is not None:  # every rank's drafter learns the accepted counts
        accepted = parallel.tp_broadcast(accepted_d if runner.rank == 0 else None, (len(a.req_slots),), torch.int64,
                                         runner.device)
        runner.draft.settle(a, drafts, verdict.accepted if runner.rank == 0 else accepted.cpu().numpy(), input_ids,
                            runner.req_to_token)
    if runner.rank != 0:
        return None
    logprobs = chosen = None
    tops = {}
    if runner.slot_params.wants_logprob[a.req_slots].any():
        logprobs = torch.log_softmax(logits[emitted_rows_d], dim=-1)
        chosen = logprobs.gather(1, verdict.emitted[:, None]).squeeze(1)
        top_k = runner.slot_params.top_logprobs_num[rows.row_slots[verdict.emitted_rows]]
        tops = {int(i): logprobs[i].topk(int(top_k[i])) for i in np.flatnonzero(top_k)}
    ids_host, lps_host, done = runner.copier.start(verdict.emitted, chosen)
    grammars_done = runner.grammars.backend.done() if runner.grammars is not None else []
    return PendingStep(b.step, t0, ids_host, lps_host, done, tops, {}, grammars_done, admit_errors,
                       accept_lens=verdict.accepted.astype(np.int32))
