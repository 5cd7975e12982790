"""Speculative decoding (NGRAM): the drafter, the exactness of acceptance, and the scheduler's verify steps.

The scheduler runs against the stand-in worker of test_overlap.py, taught verify steps: its next token is a function
of the input token (and, coarsely, the position), so n-gram drafts are often right and sometimes wrong, and greedy
acceptance must give exactly the tokens of plain decoding — with overlap on and off, chunked prefill, the radix
cache on and off, retraction, aborts, stop strings and max_new_tokens (nothing past a finish is ever reported).
Acceptance of sampled rows is checked against the target distribution with a chi-square test over many draws.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from test_overlap import (
    EOS,
    Event,
    StandInWorker,
    _tokens,
    _workload,
    check_no_kv_held,
    check_one_end_each,
    drive,
    stop_string,
    submitting,
)

from radixserve import wire
from radixserve.config import FlagError, ServerArgs
from scheduler_proc.scheduler import Scheduler
from scheduler_proc.speculative import GROW, MIN_DRAFTS, ngram_draft
from worker_proc.sampling import SlotParams, make_sampler
from worker_proc.speculative import Verifier, VerifyRows
from worker_proc.step_io import HostStaging


def test_ngram_draft_takes_what_followed_the_longest_most_recent_match() -> None:
    toks = np.array([5, 1, 2, 3, 9, 9, 7, 1, 2, 3, 4, 4, 1, 2, 3], dtype=np.int32)
    # suffix [1, 2, 3] occurs at 1..3 (then 9, 9) and 7..9 (then 4, 4): the most recent wins
    assert ngram_draft(toks, 3, 1, 12).tolist() == [4, 4, 1]
    # a longer match beats a more recent shorter one: [8, 1, 2, 3] only at the start
    toks = np.array([8, 1, 2, 3, 6, 6, 1, 2, 3, 7, 8, 1, 2, 3], dtype=np.int32)
    assert ngram_draft(toks, 2, 1, 12).tolist() == [6, 6]
    assert ngram_draft(toks, 2, 5, 12).tolist() == []  # no match of 5 tokens
    assert ngram_draft(np.array([1, 2, 3], dtype=np.int32), 4, 1, 12).tolist() == []
    assert ngram_draft(np.array([4, 4, 4], dtype=np.int32), 4, 1, 12).tolist() == [4]  # up to the end


def test_bad_speculative_flags_fail_at_start_naming_the_flag() -> None:
    with pytest.raises(FlagError, match="--speculative-num-draft-tokens"):
        ServerArgs(speculative_algorithm="NGRAM", speculative_num_draft_tokens=1)
    with pytest.raises(FlagError, match="--speculative-ngram-min-match-window-size"):
        ServerArgs(speculative_ngram_min_match_window_size=5, speculative_ngram_max_match_window_size=3)
    with pytest.raises(FlagError, match="--speculative-draft-model-path"):
        ServerArgs(speculative_algorithm="STANDALONE")
    with pytest.raises(FlagError, match="--speculative-replay-path"):
        ServerArgs(speculative_algorithm="REPLAY")
    with pytest.raises(FlagError, match="--speculative-algorithm"):
        ServerArgs(speculative_algorithm="MEDUSA")
    with pytest.raises(FlagError, match="--speculative-eagle-topk 4: only 1"):
        ServerArgs(speculative_algorithm="NGRAM", speculative_eagle_topk=4)
    with pytest.raises(FlagError, match="--speculative-num-draft-tokens 6 with --speculative-num-steps 3"):
        ServerArgs(speculative_algorithm="NGRAM", speculative_num_steps=3, speculative_num_draft_tokens=6)


def test_sglang_chain_flags_set_the_verify_width() -> None:
    """SGLang's EAGLE command line (a chain: --speculative-eagle-topk 1) parses, and --speculative-num-steps sets
    the tokens a verify step computes (num-steps + 1) where --speculative-num-draft-tokens is not given otherwise."""
    import argparse

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    line = ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "head", "--speculative-num-steps",
            "3", "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4"]
    args = ServerArgs.from_cli_args(parser.parse_args(line))
    assert (args.speculative_num_steps, args.speculative_eagle_topk, args.speculative_num_draft_tokens) == (3, 1, 4)
    assert ServerArgs(speculative_algorithm="NGRAM", speculative_num_steps=5).speculative_num_draft_tokens == 6
    assert ServerArgs(speculative_algorithm="NGRAM").speculative_num_draft_tokens == 8


# ---------------------------------------------------------------- exact acceptance


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _verifier(temperature: float, top_k: int, top_p: float, min_p: float, seed: int, batch: int,
              device: str = "cpu") -> Verifier:
    params = SlotParams(batch, torch.device(device))
    for slot in range(batch):
        params.set(wire.NewReq(slot, b"", temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                               seed=seed + slot if seed >= 0 else -1))
    return Verifier(make_sampler(params, torch.device(device), seed=0), HostStaging(torch.device(device), 1 << 16))


def _target(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The distribution plain sampling draws from (independently of the code under test)."""
    p = torch.softmax(logits / temperature, dim=-1).double().numpy()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for rank, t in enumerate(order):
        if (top_k > 0 and rank >= top_k) or mass >= top_p:
            break
        keep[t] = True
        mass += p[t]
    keep &= p >= p.max() * min_p
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p", "seed"), [
    (1.0, -1, 1.0, 0.0, -1), (0.7, 5, 0.9, 0.0, -1), (1.3, -1, 1.0, 0.05, 7)])
def test_acceptance_draws_exactly_from_the_target(temperature, top_k, top_p, min_p, seed, device) -> None:
    """Many requests with the same rows and drafts: the first emitted token is distributed as p_0 and the second,
    given the first draft was accepted, as p_1 (chi-square), whatever the drafts' luck (one likely, one not). On
    CUDA, unseeded rows go through FlashInfer's chain_speculative_sampling."""
    vocab, batch = 12, 6000
    gen = torch.Generator().manual_seed(3)
    rows_logits = torch.randn(3, vocab, generator=gen) * 1.5
    drafts = [int(rows_logits[0].argmax()), int(rows_logits[1].argsort()[-3])]  # a likely one, a less likely one
    verifier = _verifier(temperature, top_k, top_p, min_p, seed, batch, device)
    slots = np.arange(batch, dtype=np.int32)
    rows = VerifyRows.of(slots, np.zeros(batch, np.int64), np.full(batch, 2, np.int64), verifier.staging)
    logits = rows_logits.repeat(batch, 1).to(device)
    inputs = torch.tensor([0, *drafts] * batch, dtype=torch.int32, device=device)
    verdict = verifier.verify(logits, rows, inputs)
    verdict.emitted = verdict.emitted.cpu()
    firsts = verdict.emitted[torch.from_numpy(np.cumsum(verdict.accepted + 1) - verdict.accepted - 1)].numpy()
    p0, p1 = (_target(rows_logits[j], temperature, top_k, top_p, min_p) for j in (0, 1))
    _chi_square(firsts, p0)
    second = verdict.emitted.numpy()[np.cumsum(verdict.accepted + 1)[verdict.accepted >= 1] - verdict.accepted[
        verdict.accepted >= 1]]
    _chi_square(second, p1)
    assert 0 < (verdict.accepted == 2).sum() < batch  # both outcomes happened


def _chi_square(samples: np.ndarray, p: np.ndarray) -> None:
    counts = np.bincount(samples, minlength=len(p))
    assert counts[p == 0].sum() == 0, "a token outside the filtered distribution was drawn"
    live = p > 0
    expected = p[live] * len(samples)
    if live.sum() > 1:
        statistic = float(((counts[live] - expected) ** 2 / expected).sum())
        dof = int(live.sum()) - 1  # p-value: the chi-square survival function, Q(dof / 2, statistic / 2)
        assert chi2_sf(statistic, dof) > 1e-3, (counts[live], expected)


def chi2_sf(statistic: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def test_greedy_acceptance_stops_at_the_first_mismatch() -> None:
    verifier = _verifier(0.0, -1, 1.0, 0.0, -1, 2)
    logits = torch.full((6, 10), -5.0)
    for row, tok in enumerate([3, 4, 5, 6, 7, 8]):
        logits[row, tok] = 5.0
    slots = np.arange(2, dtype=np.int32)
    rows = VerifyRows.of(slots, np.zeros(2, np.int64), np.array([3, 1]), verifier.staging)
    # request 0: drafts 3, 4, 9 (third wrong: argmax 5); request 1 (rows 4, 5): draft 0 (wrong: argmax 7)
    verdict = verifier.verify(logits, rows, torch.tensor([1, 3, 4, 9, 2, 0], dtype=torch.int32))
    assert verdict.accepted.tolist() == [2, 0]
    assert verdict.emitted.tolist() == [3, 4, 5, 7]


# ---------------------------------------------------------------- the scheduler's verify steps


class VerifyingStandIn(StandInWorker):
    """The stand-in with verify steps: row j's token is what it would sample after input j; drafts are accepted
    while they equal it (greedy), then one token more."""

    def __init__(self, eos_every: int = 0) -> None:
        super().__init__(eos_every)
        self.verify_steps = self.rejected = 0
        self.verdicts: dict[int, list[tuple[int, int, int]]] = {}  # slot -> (cached, drafted, accepted) per step

    def launch(self, batch: wire.StepBatch) -> None:
        if not batch.draft_lens:
            return super().launch(batch)
        self.verify_steps += 1
        slots, ids = wire.from_i32(batch.req_slots), wire.from_i32(batch.input_ids).copy()
        cached, extend = wire.from_i32(batch.cached_lens), wire.from_i32(batch.extend_lens)
        drafts = wire.from_i32(batch.draft_lens)
        rows = np.repeat(slots, extend)
        for t in np.flatnonzero(ids < 0):
            ids[t] = self.last_sampled[int(rows[t])]
        starts = np.cumsum(extend) - extend
        tokens, accepted = [], []
        for slot, start, c, d in zip(slots.tolist(), starts.tolist(), cached.tolist(), drafts.tolist()):
            a = 0
            while a < d and self._next(int(ids[start + a]), c + a) == int(ids[start + a + 1]):
                a += 1
            self.rejected += a < d
            self.verdicts.setdefault(slot, []).append((c, d, a))
            emitted = [int(t) for t in ids[start + 1:start + 1 + a]] + [self._next(int(ids[start + a]), c + a)]
            tokens += emitted
            accepted.append(a)
            self.last_sampled[slot] = emitted[-1]
        self.results.append(wire.StepResult(step=batch.step, next_ids=wire.i32(tokens),
                                            next_logprobs=np.zeros(len(tokens), np.float32).tobytes(),
                                            accept_lens=wire.i32(accepted)))

    def _next(self, token: int, position: int) -> int:
        value = (token * 31 + (position // 40) * 7) % 23  # cycles, so earlier text predicts later text
        if self.eos_every and value % self.eos_every == 0:
            return EOS
        return 3 + value


def _spec_scheduler(pool: int, chunk: int = 32, spec: bool = True, **kw) -> Scheduler:
    flags = {"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 5} if spec else {}
    args = ServerArgs(max_running_requests=8, chunked_prefill_size=chunk, new_token_ratio=0.1, **flags, **kw)
    return Scheduler(args, num_kv_slots=pool, context_length=256)


@pytest.mark.parametrize(("pool", "radix", "threshold"), [(4000, True, 8), (4000, False, 5), (300, True, 8)])
def test_verify_steps_give_the_tokens_of_plain_decoding(pool: int, radix: bool, threshold: int) -> None:
    """Greedy: the same tokens and finishes with speculation as without, with overlap on and off; above the batch
    threshold steps are plain decode; rejected drafts' KV goes back at once (the invariants after every run)."""
    results = {}
    for spec in (False, True):
        for overlap in (False, True):
            s = _spec_scheduler(pool, spec=spec, disable_radix_cache=not radix,
                                speculative_batch_size_threshold=threshold)
            for req in _workload(30, seed=2):
                s.add_request(req)
            worker = VerifyingStandIn(eos_every=17)
            outs = drive(s, worker, overlap).outs
            s.check_invariants()
            assert s.allocator.num_free + s.cache.evictable_size == s.allocator.capacity
            results[spec, overlap] = _tokens(outs)
            assert all(seq[-1].completion_tokens == len(results[spec, overlap][rid][0]) for rid, seq in outs.items())
            if spec:
                assert worker.verify_steps > 0 and worker.rejected > 0
                assert s.counters.spec_accept_length.sum > sum(s.counters.spec_accept_length.counts)  # some accepted
                spec_outs = [seq[-1].spec for seq in outs.values() if seq[-1].spec is not None]
                assert spec_outs and sum(c.spec_accept_token_num for c in spec_outs) > 0
                _check_metrics(s, spec_outs)
    assert results[True, False] == results[False, False] == results[True, True] == results[False, True]
    assert any(kind == "stop" for _, kind in results[True, True].values())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_draft_lengths_follow_acceptance_on_the_cpu(device: str) -> None:
    """On the CPU a request that had a draft rejected proposes at most accepted + 1 drafts next (at least
    MIN_DRAFTS), and after a step that accepted all its d drafts at most d + GROW; on a GPU every request may
    propose k each step."""
    s = Scheduler(ServerArgs(max_running_requests=8, speculative_algorithm="NGRAM", speculative_num_draft_tokens=8),
                  num_kv_slots=4000, context_length=256, device=device)
    for req in _workload(30, seed=2):
        s.add_request(req)
    worker = VerifyingStandIn(eos_every=17)
    drive(s, worker, False)
    # consecutive verify steps of one request (a req slot's next request starts with a shorter context), the
    # first with drafts (a step without leaves the cap as it was)
    pairs = [(prev[1:], now[1:]) for steps in worker.verdicts.values() for prev, now in zip(steps, steps[1:])
             if now[0] > prev[0] and prev[1]]
    longest_after_miss = max(now[0] - max(MIN_DRAFTS, prev[1] + 1) for prev, now in pairs if prev[1] < prev[0])
    longest_after_hit = max(now[0] - min(7, prev[0] + GROW) for prev, now in pairs if prev[1] == prev[0])
    if device == "cpu":
        assert longest_after_miss == 0 and longest_after_hit == 0  # the caps, and reached
    else:
        assert longest_after_miss > 0  # drafts past the CPU's cap follow misses


def test_replayed_drafts_are_always_right(tmp_path) -> None:
    """REPLAY (the benchmarks' always-right draft source): the outputs of a plain run, replayed as drafts, are
    all accepted and give the same tokens; a request whose prompt was not recorded decodes without drafts."""
    reqs = _workload(20, seed=3)
    plain = _spec_scheduler(4000, spec=False)
    for req in reqs:
        plain.add_request(req)
    reference = _tokens(drive(plain, VerifyingStandIn(eos_every=17), False).outs)
    recorded = [list(req.input_ids) + reference[req.rid][0] for req in reqs[:15]]
    (tmp_path / "replay.json").write_text(json.dumps(recorded))
    s = _spec_scheduler(4000, spec=False, speculative_algorithm="REPLAY", speculative_num_draft_tokens=5,
                        speculative_replay_path=str(tmp_path / "replay.json"))
    for req in reqs:
        s.add_request(req)
    worker = VerifyingStandIn(eos_every=17)
    assert _tokens(drive(s, worker, False).outs) == reference
    assert worker.verify_steps > 0 and worker.rejected == 0
    assert s.counters.spec_accept_length.sum > 2 * sum(s.counters.spec_accept_length.counts)


@pytest.mark.parametrize("overlap", [False, True])
def test_random_traffic_with_speculation_ends_every_request_once(overlap: bool) -> None:
    """Aborts, disconnects and stop strings at random moments (verify steps in flight among them), small pools
    (retraction): one final message and one end per request, no KV slot held after, nothing past a finish."""
    for seed in range(12):
        rng = random.Random(seed)
        pool = rng.randrange(120, 600)
        s = _spec_scheduler(pool, rng.randrange(8, 64))
        events: dict[int, list[Event]] = defaultdict(list)
        rids: list[str] = []
        refused: set[str] = set()
        for req in _workload(12, seed):
            events[rng.randrange(0, 20)].append(submitting(req, rids, refused))
            end, at = rng.choice([None, None, "abort", "stop string"]), rng.randrange(0, 60)
            if end == "abort":
                events[at].append(lambda s, rec, rid=req.rid: s.abort(rid))
            elif end == "stop string":
                events[at].append(stop_string(req.rid, rng.randrange(0, 3)))
        rec = drive(s, VerifyingStandIn(eos_every=11), overlap, events)
        check_one_end_each(s, rec, rids, refused)
        check_no_kv_held(s)
        for rid, seq in rec.outs.items():
            received = sum(len(o.new_ids) for o in seq)
            max_new = next(r.sampling.max_new_tokens for r in _workload(12, seed) if r.rid == rid)
            assert received <= max_new
            if seq[-1].finish.matched == EOS:  # the stop token is the last one reported
                assert [t for o in seq for t in o.new_ids][-1] == EOS


def _check_metrics(s: Scheduler, counts: list[wire.SpecCounts]) -> None:
    """/metrics' spec_accept_length histogram: one observation per request and verify step, summing to the tokens
    those steps emitted."""
    from prometheus_client import CollectorRegistry, generate_latest

    from radixserve.gateway.metrics import _Families
    from tokenizer_proc.metrics import RequestMetrics

    info = s.info()
    assert sum(info.spec_accept_length.counts) == sum(c.spec_verify_ct for c in counts)
    assert info.spec_accept_length.sum == sum(c.spec_verify_ct + c.spec_accept_token_num for c in counts)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families("m", info, RequestMetrics().stats))
    text = generate_latest(registry).decode()
    assert f'radixserve:spec_accept_length_count{{model_name="m"}} {float(sum(info.spec_accept_length.counts))}' in text
