"""Worker 0's per-slot logit processing on the CPU: penalties and logit bias against their formulas, and xgrammar
matchers that mask, follow the sampled tokens, and are rebuilt from a re-admitted request's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radixserve import wire
from radixserve.model_files import resolve_model
from worker_proc.grammar import GrammarBackend, SlotGrammars
from worker_proc.penalties import SlotPenalties
from worker_proc.step_io import HostStaging

VOCAB = 50
EOS = 2


def penalties(frequency=0.0, presence=0.0, repetition=1.0, bias: dict[int, float] | None = None) -> wire.Penalties:
    bias = bias or {}
    return wire.Penalties(frequency, presence, repetition, wire.i32(list(bias)),
                          np.array(list(bias.values()), np.float32).tobytes())


def reference(logits: np.ndarray, counts: np.ndarray, p: wire.Penalties) -> np.ndarray:
    """SGLang's penalties, one row at a time."""
    out = logits.copy()
    seen = counts > 0
    out[seen] = np.where(out[seen] > 0, out[seen] / p.repetition, out[seen] * p.repetition)
    out -= p.frequency * counts + p.presence * seen
    ids = wire.from_i32(p.bias_ids)
    out[ids] += np.frombuffer(p.bias_values, np.float32)
    return out


def test_penalties_match_their_formulas_and_count_only_kept_samples() -> None:
    state = SlotPenalties(max_reqs=8, vocab_size=VOCAB, staging=HostStaging(torch.device("cpu"), 1024))
    prior = [5, 5, 9]  # a re-admitted request's output so far
    params = {4: penalties(frequency=0.7, presence=0.3), 7: penalties(repetition=1.6, bias={3: 2.5, 11: -4.0})}
    state.set(4, params[4])
    state.set(7, params[7], wire.i32(prior))
    state.set(1, None)
    assert state.counts is not None and state.counts[1].sum() == 0
    slots = np.array([4, 1, 7], np.int32)
    d_slots = torch.from_numpy(slots)
    counts = {4: np.zeros(VOCAB), 7: np.bincount(prior, minlength=VOCAB).astype(float)}
    rng = np.random.default_rng(0)
    for step in range(6):
        logits = rng.normal(size=(3, VOCAB)).astype(np.float32) * 3
        processed = torch.from_numpy(logits.copy())
        state.apply(processed, slots, d_slots)
        np.testing.assert_allclose(processed[1].numpy(), logits[1])  # unpenalized: untouched
        for row, slot in ((0, 4), (2, 7)):
            np.testing.assert_allclose(processed[row].numpy(), reference(logits[row], counts[slot], params[slot]),
                                       rtol=1e-5, atol=1e-5)
        sampled = torch.tensor([step % 4 + 5, 1, step % 2 + 5])
        kept = np.array([True, True, step != 3])  # step 3: row 2 samples a prompt chunk, thrown away
        state.record(slots, d_slots, sampled, kept)
        counts[4][sampled[0]] += 1
        if kept[2]:
            counts[7][sampled[2]] += 1
    np.testing.assert_array_equal(state.counts[4].numpy(), counts[4])
    np.testing.assert_array_equal(state.counts[7].numpy(), counts[7])


@pytest.fixture(scope="module")
def grammars() -> SlotGrammars:
    from transformers import AutoTokenizer

    model_dir = resolve_model(None)
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    return SlotGrammars(GrammarBackend(model_dir, vocab), torch.device("cpu"))


def greedy(grammars: SlotGrammars, slot: int, logits: torch.Tensor, steps: int) -> list[int]:
    """Mask, take the best allowed token, let the matcher follow it; `logits` favour tokens the grammar forbids."""
    out = []
    slots = np.array([slot], np.int32)
    for _ in range(steps):
        row = logits.clone()[None]
        grammars.mask(row, slots, np.array([True]))
        token = row.argmax(dim=-1)
        grammars.record(slots, token, np.array([True]))
        out.append(int(token))
        if out[-1] == EOS:
            break
    return out


def test_a_matcher_masks_follows_and_is_rebuilt_from_output(grammars: SlotGrammars) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(grammars.backend.tokenizer_path)
    regex = wire.Grammar("regex", "[0-9]{3}-ok")
    grammars.backend.start([wire.CompileGrammar(5, regex)])
    done = []
    while not done:
        done = grammars.backend.done(wait=True)
    assert done == [wire.GrammarDone(5)]
    vocab = grammars.backend.vocab_size
    logits = torch.zeros(vocab)
    logits[tok.encode("hello")[0]] = 50.0  # what the model "wants" is outside the grammar
    logits[tok.encode("7")[0]] = 1.0
    grammars.set(3, regex, np.array([EOS], np.int32))
    out = greedy(grammars, 3, logits, 20)
    assert out[-1] == EOS and tok.decode(out[:-1]) == "777-ok"
    # Re-admitted after two tokens: the rebuilt matcher goes on from there.
    grammars.set(3, regex, np.array([EOS], np.int32), wire.i32(out[:2]))
    rest = greedy(grammars, 3, logits, 20)
    assert out[:2] + rest == out
    grammars.set(3, None, np.array([EOS], np.int32))
    assert not grammars.constrained(np.array([3], np.int32)).any()


def test_an_invalid_grammar_reports_xgrammars_message(grammars: SlotGrammars) -> None:
    grammars.backend.start([wire.CompileGrammar(9, wire.Grammar("json_schema", '{"type": "nonsense"}'))])
    done = []
    while not done:
        done = grammars.backend.done(wait=True)
    assert done[0].gid == 9 and done[0].error.startswith("invalid grammar:") and "/project" not in done[0].error
