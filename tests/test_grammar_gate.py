"""The scheduler's side of structured output and penalties, in isolation (a stand-in answers each step, as in
test_scheduler.py): requests wait for their grammar to compile, an invalid grammar is a rejection, and a
request's NewReq carries its penalties, grammar and (at re-admission) its output. Real processes:
test_structured_output.py."""

from __future__ import annotations

import numpy as np
import pytest

from radixserve import wire
from radixserve.config import ServerArgs
from scheduler_proc.scheduler import RequestError, Scheduler

REGEX = r"[a-z]{3}"


def request(rid: str, n_prompt: int = 10, max_new: int = 4, **sampling) -> wire.GenerateTokens:
    return wire.GenerateTokens(rid=rid, input_ids=list(range(3, 3 + n_prompt)), eos_token_ids=[2],
                               sampling=wire.SamplingParams(max_new_tokens=max_new, **sampling))


def answer(batch: wire.StepBatch, done: list[wire.GrammarDone] = (), token: int = 7) -> wire.StepResult:
    n = len(wire.from_i32(batch.req_slots))
    return wire.StepResult(step=batch.step, next_ids=wire.i32([token] * n),
                           next_logprobs=np.zeros(n, np.float32).tobytes(), grammars_done=list(done))


def test_a_request_waits_for_its_grammar_and_its_step_carries_the_compile_job() -> None:
    s = Scheduler(ServerArgs(disable_overlap_schedule=True), num_kv_slots=512, context_length=256)
    s.add_request(request("plain"))
    s.add_request(request("constrained", regex=REGEX))
    s.add_request(request("same-grammar", regex=REGEX))
    batch = s.schedule().batch
    assert [r.rid for r, _ in s.inflight[0].entries] == ["plain"]  # the others are held
    assert [job.grammar for job in batch.grammars] == [wire.Grammar("regex", REGEX)]  # one job for both
    assert s.has_work and len(s.grammars) == 2
    s.process_result(answer(batch, [wire.GrammarDone(batch.grammars[0].gid)]))
    batch = s.schedule().batch
    admitted = {nr.req_slot: nr for nr in batch.new_reqs}
    assert len(admitted) == 2 and all(nr.grammar == wire.Grammar("regex", REGEX) for nr in admitted.values())
    assert not batch.grammars  # compiled once: a later request with it is queued at once
    s.add_request(request("later", regex=REGEX))
    assert len(s.grammars) == 0 and len(s.waiting) == 1


def test_with_nothing_else_to_run_a_step_of_no_requests_waits_for_the_compile() -> None:
    s = Scheduler(ServerArgs(disable_overlap_schedule=True), num_kv_slots=512, context_length=256)
    s.add_request(request("constrained", json_schema='{"type": "object"}'))
    batch = s.schedule().batch
    assert batch.req_slots == b"" and len(batch.grammars) == 1
    s.process_result(answer(batch))  # nothing compiled yet
    batch = s.schedule().batch
    assert batch.req_slots == b"" and not batch.grammars  # waiting again, the job already sent
    s.process_result(answer(batch, [wire.GrammarDone(0)]))
    assert [r.rid for r in s.waiting] == ["constrained"]
    assert s.schedule().batch.new_reqs[0].grammar.kind == "json_schema"


def test_an_invalid_grammar_rejects_its_requests_and_the_next_ones_at_once() -> None:
    s = Scheduler(ServerArgs(disable_overlap_schedule=True), num_kv_slots=512, context_length=256)
    s.add_request(request("bad-1", regex="(ab"))
    s.add_request(request("bad-2", regex="(ab"))
    outcome = s.process_result(answer(s.schedule().batch, [wire.GrammarDone(0, "invalid grammar: unclosed")]))
    assert [(dest, r.rid, r.status) for dest, r in outcome.replies] == [(0, "bad-1", 400), (0, "bad-2", 400)]
    assert all(isinstance(r, wire.Rejected) and r.message == "invalid grammar: unclosed" for _, r in outcome.replies)
    assert not outcome.outs
    assert not s.has_work and not s.lifecycle.reqs
    with pytest.raises(RequestError, match="unclosed"):
        s.add_request(request("bad-3", regex="(ab"))
    s.check_invariants()


def test_a_held_request_can_be_aborted() -> None:
    s = Scheduler(ServerArgs(disable_overlap_schedule=True), num_kv_slots=512, context_length=256)
    s.add_request(request("constrained", regex=REGEX))
    batch = s.schedule().batch
    ((_, out),) = s.abort("constrained").outs
    assert out.finish.type == "abort" and not s.lifecycle.reqs
    s.process_result(answer(batch, [wire.GrammarDone(0)]))
    assert not s.waiting and not s.has_work
    s.check_invariants()


def test_grammar_backend_none_rejects_structured_output() -> None:
    s = Scheduler(ServerArgs(grammar_backend="none"), num_kv_slots=512, context_length=256)
    with pytest.raises(RequestError, match="--grammar-backend none"):
        s.add_request(request("constrained", ebnf='root ::= "a"'))


def test_new_req_carries_penalties_and_bias_ids_are_checked() -> None:
    s = Scheduler(ServerArgs(disable_overlap_schedule=True), num_kv_slots=512, context_length=256, vocab_size=100)
    with pytest.raises(RequestError, match=r"\[0, 100\)"):
        s.add_request(request("bad-bias", logit_bias={"100": 1.0}))
    s.add_request(request("plain"))
    s.add_request(request("penalized", repetition_penalty=1.3, logit_bias={"5": -2.5, "9": 4.0}))
    by_slot = {nr.req_slot: nr for nr in s.schedule().batch.new_reqs}
    plain, penalized = by_slot[0], by_slot[1]
    assert plain.penalties is None and plain.grammar is None
    p = penalized.penalties
    assert (p.frequency, p.presence, p.repetition) == (0.0, 0.0, pytest.approx(1.3))
    assert wire.from_i32(p.bias_ids).tolist() == [5, 9]
    assert np.frombuffer(p.bias_values, np.float32).tolist() == [-2.5, 4.0]


def test_chunk_samples_are_marked_and_a_readmitted_request_brings_its_output() -> None:
    """sample_offsets is -1 for a chunk of a longer prompt; after retraction, NewReq.output_ids is the output so
    far, from which the workers rebuild penalty counts and grammar matchers."""
    args = ServerArgs(disable_overlap_schedule=True, chunked_prefill_size=8, new_token_ratio=0.05)
    s = Scheduler(args, num_kv_slots=121, context_length=256)
    s.add_request(request("long", n_prompt=20, max_new=4))
    offsets = []
    while s.lifecycle.reqs:
        batch = s.schedule().batch
        offsets += wire.from_i32(batch.sample_offsets).tolist()
        s.process_result(answer(batch))
    assert offsets == [-1, -1, 0, 1, 2, 3]  # two chunks of 8, then the last 4 prompt tokens sample output 0
    for i in range(6):
        s.add_request(request(f"r{i}", max_new=30, ignore_eos=True, frequency_penalty=0.5))
    readmitted = []
    while s.lifecycle.reqs:
        batch = s.schedule().batch
        readmitted += [nr for nr in batch.new_reqs if nr.output_ids]
        s.process_result(answer(batch, token=11))
    assert s.counters.retracted_requests > 0 and readmitted
    assert all(set(wire.from_i32(nr.output_ids).tolist()) == {11} and nr.penalties is not None for nr in readmitted)
