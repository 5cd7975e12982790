"""The offline Engine on the default model: greedy tokens equal HF transformers, with the radix cache on and off."""

from __future__ import annotations

import pytest
import torch

from radixserve import Engine
from radixserve.model_files import resolve_model

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three prime numbers."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Is water wet?"}],
    [{"role": "user", "content": "Explain what a radix tree is in two sentences."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [{"role": "user", "content": "What is 17 times 3?"}],
    [{"role": "user", "content": "Give me a short tip for writing clean Python code."}],
]
MAX_NEW = 32
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW}


@pytest.fixture(scope="module")
def hf_model():
    """HF transformers' model and tokenizer on the same (converted) weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model(None)
    return (AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


def _hf_greedy(model, input_ids: torch.Tensor, max_new_tokens: int, **inputs) -> list[int]:
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, **inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, input_ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def hf_reference(hf_model):
    """Greedy continuations from HF, one prompt at a time."""
    model, tok = hf_model
    refs = []
    for messages in PROMPTS:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        refs.append(_hf_greedy(model, **ids, max_new_tokens=MAX_NEW))
    return refs


@pytest.fixture(scope="module")
def engine():
    with Engine(dtype="float32", max_total_tokens=8192, max_running_requests=16, chunked_prefill_size=256) as eng:
        yield eng


@pytest.fixture(scope="module")
def engine_no_radix():
    with Engine(dtype="float32", max_total_tokens=8192, max_running_requests=16, disable_radix_cache=True) as eng:
        yield eng


def _assert_matches(results: list[dict], refs: list[list[int]]) -> None:
    for res, ref in zip(results, refs):
        assert res["output_ids"] == ref
        reason = res["meta_info"]["finish_reason"]
        assert reason["type"] == ("length" if len(ref) == MAX_NEW else "stop")


def test_greedy_matches_hf_one_at_a_time(engine, hf_reference):
    results = [engine.generate(p, GREEDY) for p in PROMPTS]
    _assert_matches(results, hf_reference)
    engine.check_invariants()


def test_greedy_matches_hf_all_at_once_then_from_the_cache(engine, hf_reference):
    engine.flush_cache()
    _assert_matches(engine.generate(PROMPTS, GREEDY), hf_reference)
    engine.check_invariants()
    again = engine.generate(PROMPTS, GREEDY)
    _assert_matches(again, hf_reference)
    for res in again:
        assert res["meta_info"]["cached_tokens"] >= res["meta_info"]["prompt_tokens"] - 1


@pytest.mark.long  # radix on == off stays in make test: test_reliability_determinism, test_bench's no-radix baseline
def test_greedy_matches_hf_without_radix_cache(engine_no_radix, hf_reference):
    _assert_matches([engine_no_radix.generate(p, GREEDY) for p in PROMPTS], hf_reference)
    _assert_matches(engine_no_radix.generate(PROMPTS, GREEDY), hf_reference)
    again = engine_no_radix.generate(PROMPTS[:2], GREEDY)
    assert all(r["meta_info"]["cached_tokens"] == 0 for r in again)
    engine_no_radix.check_invariants()


@pytest.mark.long  # overlap on == off stays in make test: test_overlap.py::test_overlap_gives_the_same_tokens
def test_overlap_on_and_off_give_the_same_tokens(engine, hf_reference):
    """Overlap scheduling (the default, `engine`) against stepping one step at a time: greedy tokens both equal
    HF's, and seeded sampling (independent of batch composition) draws the same tokens."""
    sampled = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "max_new_tokens": 24, "seed": 11}
    with Engine(dtype="float32", max_total_tokens=8192, max_running_requests=16,
                disable_overlap_schedule=True) as sync:
        _assert_matches(sync.generate(PROMPTS, GREEDY), hf_reference)
        sync_sampled = [r["output_ids"] for r in sync.generate(PROMPTS, sampled)]
        sync.check_invariants()
    assert [r["output_ids"] for r in engine.generate(PROMPTS, sampled)] == sync_sampled
    assert engine.generate(PROMPTS[0], sampled)["output_ids"] == sync_sampled[0]


def test_shared_prefix_is_reused(engine):
    engine.flush_cache()
    prefix = list(range(1000, 1200))  # 200 tokens
    first = engine.generate(input_ids=prefix + [5, 6, 7], sampling_params={"temperature": 0, "max_new_tokens": 4})
    second = engine.generate(input_ids=prefix + [8, 9], sampling_params={"temperature": 0, "max_new_tokens": 4})
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] >= 199
    info = engine.check_invariants()
    assert info["num_running_reqs"] == 0


def test_chunked_prefill_matches_hf(engine, hf_model):
    long_prompt = list(range(300, 1100))  # 800 tokens over chunks of 256
    engine.flush_cache()
    chunked = engine.generate(input_ids=long_prompt, sampling_params={"temperature": 0, "max_new_tokens": 8,
                                                                      "ignore_eos": True})
    assert chunked["output_ids"] == _hf_greedy(hf_model[0], torch.tensor([long_prompt]), 8, eos_token_id=None)


def test_stop_strings_and_tokens(engine):
    base = engine.generate(PROMPTS[2], GREEDY)
    text = base["text"]
    assert len(text) > 10
    stop = text[5:9]
    res = engine.generate(PROMPTS[2], {**GREEDY, "stop": [stop]})
    assert res["text"] == text[: text.index(stop)]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    token = base["output_ids"][3]
    res = engine.generate(PROMPTS[2], {**GREEDY, "stop_token_ids": [token]})
    assert res["output_ids"][-1] == token and len(res["output_ids"]) <= 4
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": token}
    res = engine.generate(PROMPTS[2], {**GREEDY, "max_new_tokens": 5, "ignore_eos": True})
    assert res["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert res["meta_info"]["completion_tokens"] == 5
    engine.check_invariants()


def test_sampling_seed_is_reproducible(engine):
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_new_tokens": 16, "seed": 1234, "ignore_eos": True}
    a = engine.generate(PROMPTS[1], params)
    b = engine.generate([PROMPTS[1], PROMPTS[0]], [params, {**params, "seed": 7}])[0]
    c = engine.generate(PROMPTS[1], {**params, "seed": 99})
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]


def test_min_new_tokens_and_prefill_only(engine):
    res = engine.generate(PROMPTS[3], {"temperature": 0, "max_new_tokens": 20, "min_new_tokens": 12})
    assert res["meta_info"]["completion_tokens"] >= 12
    res = engine.generate(PROMPTS[3], {"max_new_tokens": 0})
    assert res["output_ids"] == [] and res["meta_info"]["finish_reason"]["type"] == "length"


def test_logprobs(engine):
    res = engine.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 4}, return_logprob=True,
                          logprob_start_len=0, top_logprobs_num=2)
    meta = res["meta_info"]
    out = meta["output_token_logprobs"]  # [logprob, token id, token text]
    assert [e[1] for e in out] == res["output_ids"]
    assert all(e[0] <= 0 and isinstance(e[2], str) for e in out)
    # Greedy picks the most likely token: its logprob is the top-1 of the same step.
    assert all(abs(e[0] - top[0][0]) < 1e-4 and top[0][1] == e[1] for e, top in zip(out, meta["output_top_logprobs"]))
    inp = meta["input_token_logprobs"]
    assert len(inp) == meta["prompt_tokens"] and inp[0][0] is None
    assert all(e[0] is not None and e[0] <= 0 for e in inp[1:])


def test_invalid_requests_are_rejected(engine):
    res = engine.generate(input_ids=list(range(10, 3000)), sampling_params={"max_new_tokens": 8000})
    assert res["meta_info"]["finish_reason"]["type"] == "abort"
    assert "context length" in res["meta_info"]["finish_reason"]["message"]
    with pytest.raises(ValueError):
        engine.generate("", {"max_new_tokens": 4})
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("Hi", {"top_p": 0})
    res = engine.generate(input_ids=[1, 2, 3], sampling_params={"stop_token_ids": [10**6]})
    assert res["meta_info"]["finish_reason"]["type"] == "abort"
    # Token ids: malformed ones fail validation here, ids past the model's vocabulary in the scheduler.
    for bad in ([1, -1], [1, "2"]):
        with pytest.raises(ValueError, match="input_ids"):
            engine.generate(input_ids=bad)
    finish = engine.generate(input_ids=[1, 10**9])["meta_info"]["finish_reason"]
    assert finish["type"] == "abort" and finish["status_code"] == 400 and "token ids" in finish["message"]
    engine.check_invariants()


def test_the_engine_answers_as_generate_does(engine):
    """One front-end core under the Engine and /generate: the same sub-requests (n copies of a prompt, rids
    "{rid}-{k}") and the same answer's shape."""
    copies = engine.generate("Hi", {"n": 2, "temperature": 0, "max_new_tokens": 4})
    assert isinstance(copies, list) and len(copies) == 2
    assert copies[0]["output_ids"] == copies[1]["output_ids"] and len(copies[0]["output_ids"]) == 4
    assert [c["meta_info"]["id"][-2:] for c in copies] == ["-0", "-1"]
    assert set(copies[0]["meta_info"]) == {"id", "prompt_tokens", "completion_tokens", "cached_tokens",
                                           "cached_tokens_details", "finish_reason", "e2e_latency"}
    with pytest.raises(ValueError, match="sampling_params must be one object or one per prompt"):
        engine.generate(["a", "b"], [{"max_new_tokens": 1}])
