"""The Engine end to end on tiny random Llama / Qwen2 / Qwen3 / Mistral safetensors models, and at tp_size 2 on CPU."""

from __future__ import annotations

import pytest
import torch
from test_models import needs_cpu_kernels, tiny_models  # noqa: F401 (fixture)
from transformers import AutoModelForCausalLM

from radixserve import Engine

PROMPTS = [[5, 17, 33, 2, 9, 41, 100], [7, 7, 7], [200, 3, 15, 8, 99, 12, 61, 250, 4, 1, 77]]
STEPS = 12


def hf_greedy(hf: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False)
    return out[0, len(prompt):].tolist()


def engine_greedy(model_dir: str, dtype: str = "float32", **kw) -> list[list[int]]:
    with Engine(model_dir, dtype=dtype, skip_tokenizer_init=True, max_total_tokens=512, max_running_requests=4,
                chunked_prefill_size=8, **kw) as eng:
        params = {"temperature": 0, "max_new_tokens": STEPS, "ignore_eos": True}
        batch = [r["output_ids"] for r in eng.generate(input_ids=PROMPTS, sampling_params=params)]
        again = eng.generate(input_ids=PROMPTS[0], sampling_params=params)
        assert again["meta_info"]["cached_tokens"] == len(PROMPTS[0]) - 1
        assert again["output_ids"] == batch[0]
        eng.check_invariants()
        return batch


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_engine_matches_hf(tiny_models, kind):  # noqa: F811
    model_dir, hf = tiny_models[kind]
    assert engine_greedy(model_dir) == [hf_greedy(hf, p) for p in PROMPTS]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tp2_matches_tp1(tiny_models, kind):  # noqa: F811
    model_dir, hf = tiny_models[kind]
    assert engine_greedy(model_dir, tp_size=2) == [hf_greedy(hf, p) for p in PROMPTS]


@needs_cpu_kernels
@pytest.mark.parametrize("tp_size", [1, 2])
def test_bf16_cpu_kernels_match_hf_bf16(tiny_models, tp_size):  # noqa: F811
    """In bf16 the CPU worker runs cpu_kernels (packed linears, fused norm and SiLU, paged attention for chunked
    prefill over a cached prefix and for decode), sharded at tp 2: the greedy tokens of HF's bf16 `generate`."""
    model_dir, _ = tiny_models["llama"]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    assert engine_greedy(model_dir, "bfloat16", tp_size=tp_size) == [hf_greedy(hf, p) for p in PROMPTS]


def test_tp_size_that_does_not_divide_the_heads_fails_clearly():
    # SmolLM2-135M has 9 attention heads: it cannot be split over 2 ranks.
    with pytest.raises(RuntimeError, match=r"attention heads \(9\) is not divisible"):
        Engine(dtype="float32", tp_size=2, max_total_tokens=1024)


def test_mistral_sliding_window_across_chunks_and_a_radix_hit(tmp_path):
    """Attention honours the 6-position window past it: a 22-token prompt prefilled in chunks of 8 (later chunks'
    queries see only the end of the earlier ones), then served again from the radix cache, gives HF's greedy
    tokens; the context is the model's whole length, not the window."""
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=251, max_position_embeddings=128, sliding_window=6), attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(tmp_path)
    prompt = PROMPTS[2] * 2
    want = hf_greedy(hf, prompt)
    with Engine(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_total_tokens=256,
                chunked_prefill_size=8) as eng:
        assert eng.runtime.context_length == 128
        assert not eng.runtime.cascade_attention  # the torch backend: the scheduler sends no prefix groups
        params = {"temperature": 0, "max_new_tokens": STEPS, "ignore_eos": True}
        assert eng.generate(input_ids=prompt, sampling_params=params)["output_ids"] == want
        again = eng.generate(input_ids=prompt, sampling_params=params)
        assert again["meta_info"]["cached_tokens"] == len(prompt) - 1
        assert again["output_ids"] == want
        eng.check_invariants()
