"""Speculative decoding (NGRAM) on the default model in float32, through the offline Engine: greedy tokens equal
those without speculation (and HF transformers) across batch sizes, chunked prefill and radix hits; logprobs
agree; seeded sampling draws the same distribution (chi-square over many samples); meta_info carries SGLang's
spec_* counts. In bf16 with --enable-deterministic-inference, too, the greedy tokens equal plain decoding's.
make test runs the greedy and the chi-square checks (the engines are most of the time); the HF, logprob and bf16
checks are `long`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_speculative import chi2_sf

from radixserve import Engine
from radixserve.model_files import resolve_model

PASSAGE = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk. He polished the great lens, "
           "trimmed the wick, and watched the ships pass through the narrow strait below.")
PROMPTS = [
    [{"role": "user", "content": f"Repeat the following passage exactly:\n\n{PASSAGE}"}],
    [{"role": "user", "content": f"Rewrite this passage, changing 'evening' to 'morning':\n\n{PASSAGE}"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
MAX_NEW = 32
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW}
ENGINE = {"dtype": "float32", "max_total_tokens": 8192, "max_running_requests": 8, "chunked_prefill_size": 48}


@pytest.fixture(scope="module")
def plain():
    with Engine(**ENGINE) as eng:
        yield eng


@pytest.fixture(scope="module")
def spec():
    with Engine(**ENGINE, speculative_algorithm="NGRAM", speculative_num_draft_tokens=6,
                speculative_batch_size_threshold=8) as eng:
        yield eng


@pytest.fixture(scope="module")
def reference(plain):
    return [o["output_ids"] for o in plain.generate(PROMPTS, GREEDY)]


def test_greedy_tokens_equal_plain_decoding(spec, reference) -> None:
    """All five at once, one at a time (batch 1), and again (the radix cache holds every prompt): the same
    tokens each time (chunked prefill: 48 tokens a step); the prompts that copy a passage accept long drafts."""
    together = spec.generate(PROMPTS, GREEDY)
    assert [o["output_ids"] for o in together] == reference
    alone = [spec.generate(PROMPTS[i], GREEDY) for i in (0, 2)]
    assert [o["output_ids"] for o in alone] == [reference[0], reference[2]]
    again = spec.generate(PROMPTS[:2], GREEDY)
    assert [o["output_ids"] for o in again] == reference[:2]
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
    meta = alone[0]["meta_info"]
    assert meta["spec_verify_ct"] > 0 and meta["spec_accept_token_num"] > 0
    assert meta["spec_accept_length"] > 2.0  # a copy: most drafts right
    assert meta["spec_accept_token_num"] <= meta["spec_draft_token_num"]


@pytest.mark.long
def test_bf16_greedy_tokens_equal_plain_decoding_with_deterministic_inference() -> None:
    """bf16 with --enable-deterministic-inference (issue 28's mode, where a verify step's extend rounds as the
    decode steps it stands for): NGRAM's tokens equal plain decoding's all at once, one at a time and as radix
    hits, while drafts are accepted."""
    flags = {**ENGINE, "dtype": "bfloat16", "enable_deterministic_inference": True}
    params = {"temperature": 0, "max_new_tokens": 48}
    with Engine(**flags) as eng:
        reference = [o["output_ids"] for o in eng.generate(PROMPTS, params)]
    with Engine(**flags, speculative_algorithm="NGRAM", speculative_num_draft_tokens=6,
                speculative_batch_size_threshold=8) as eng:
        together = eng.generate(PROMPTS, params)
        alone = [eng.generate(PROMPTS[i], params) for i in (0, 3)]
        again = eng.generate(PROMPTS[:2], params)
    assert [o["output_ids"] for o in together] == reference
    assert [o["output_ids"] for o in alone] == [reference[0], reference[3]]
    assert [o["output_ids"] for o in again] == reference[:2]
    assert sum(o["meta_info"]["spec_accept_token_num"] for o in together + alone + again) > 48


@pytest.mark.long
def test_greedy_tokens_equal_hf_transformers(spec) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    for messages in PROMPTS[1:2]:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=20, do_sample=False)
        ref = out[0, ids["input_ids"].shape[1]:].tolist()
        assert spec.generate(messages, {"temperature": 0, "max_new_tokens": 20})["output_ids"] == ref


@pytest.mark.long
def test_logprobs_and_limits_with_speculation(spec, plain) -> None:
    """Output logprobs match plain decoding's (a verify step is an extend: float32 rounding only); max_new_tokens
    is never passed within a verify step."""
    a = spec.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 13}, return_logprob=True, top_logprobs_num=2)
    b = plain.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 13}, return_logprob=True, top_logprobs_num=2)
    assert a["output_ids"] == b["output_ids"] and len(a["output_ids"]) == 13
    la = [e[0] for e in a["meta_info"]["output_token_logprobs"]]
    lb = [e[0] for e in b["meta_info"]["output_token_logprobs"]]
    assert len(la) == 13 and np.allclose(la, lb, atol=2e-3)
    assert [[t[1] for t in top] for top in a["meta_info"]["output_top_logprobs"]] == [
        [t[1] for t in top] for top in b["meta_info"]["output_top_logprobs"]]


def test_seeded_sampling_draws_the_same_distribution(spec, plain) -> None:
    """Many seeded samples of the tokens after a copied passage's first (where drafts are verified), eight at a
    time (at the speculation threshold): the distribution of output tokens 1-2 with speculation is that without
    (two-sample chi-square over the tokens seen, rare ones pooled)."""
    n, batch = 64, 8
    sp = [{"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 3, "seed": i} for i in range(n)]
    draws = {}
    for name, eng in (("spec", spec), ("plain", plain)):
        outs = [o for i in range(0, n, batch) for o in eng.generate([PROMPTS[0]] * batch, sp[i:i + batch])]
        draws[name] = [t for o in outs for t in o["output_ids"][1:3]]
        if name == "spec":
            assert sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs) >= n // 2
    tokens = sorted(set(draws["spec"]) | set(draws["plain"]))
    table = np.array([[d.count(t) for t in tokens] for d in draws.values()], dtype=np.float64)
    common = table.sum(axis=0) >= 10
    table = np.concatenate([table[:, common], table[:, ~common].sum(axis=1, keepdims=True)], axis=1)
    table = table[:, table.sum(axis=0) > 0]
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    assert table.shape[1] >= 3, "too few distinct tokens to compare"
    assert chi2_sf(statistic, table.shape[1] - 1) > 1e-3
