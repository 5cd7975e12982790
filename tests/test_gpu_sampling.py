"""Penalties, logit bias and xgrammar structured output on the GPU path (CUDA graphs, overlap scheduling, pinned
host copies of grammar rows' tokens), through the Engine on a tiny random model with a byte-level tokenizer.

Runs only where CUDA is available (the device machine); skipped on CPU, where tests/test_structured_output.py and
tests/test_sampling_extras.py run the same code on the real default model.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from test_gpu import save_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

EOS = "<eos>"


def save_byte_tokenizer(path: str) -> None:
    """A byte-level BPE tokenizer with no merges: ids 0..255 are the bytes, 256 is EOS (the model's vocabulary,
    1000, is larger: xgrammar never allows the ids past the tokenizer's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(byte_level_chars())} | {EOS: 256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(path)


def byte_level_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from radixserve import Engine

    path = str(tmp_path_factory.mktemp("tiny-bytes"))
    save_tiny("qwen2", path, seed=5)
    save_byte_tokenizer(path)
    with Engine(path, max_total_tokens=4096, max_running_requests=16, cuda_graph_max_bs=16,
                constrained_json_disable_any_whitespace=True) as eng:
        yield eng


def test_grammars_hold_on_the_gpu_path(engine) -> None:
    regex = r"[abc]{4}-[0-9]{2}"
    outs = engine.generate(["x"] * 12, [{"regex": regex, "temperature": 1.0, "seed": i, "max_new_tokens": 16}
                                        for i in range(12)])
    assert all(re.fullmatch(regex, o["text"]) for o in outs), [o["text"] for o in outs]
    assert len({o["text"] for o in outs}) > 1  # sampled, not all the same
    schema = {"type": "object", "properties": {"k": {"type": "string", "enum": ["yes", "no"]}}, "required": ["k"]}
    outs = engine.generate(["y"] * 4, {"json_schema": json.dumps(schema), "temperature": 0.7, "max_new_tokens": 40})
    assert all(json.loads(o["text"])["k"] in ("yes", "no") for o in outs), [o["text"] for o in outs]
    bad = engine.generate("z", {"regex": "(unclosed"})
    assert bad["meta_info"]["finish_reason"]["status_code"] == 400
    engine.check_invariants()


def test_penalties_and_bias_on_the_gpu_path(engine) -> None:
    greedy = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    favoured = {**greedy, "logit_bias": {"65": 8.0}}  # "A"
    base = engine.generate("hello", favoured)["output_ids"]
    penalized = engine.generate("hello", {**favoured, "frequency_penalty": 2.0})["output_ids"]
    assert Counter(base)[65] > Counter(penalized)[65] > 0
    # In one batch, with CUDA graphs: penalized rows do not disturb the others.
    plain = engine.generate("hello", greedy)["output_ids"]
    mixed = engine.generate(["hello"] * 3, [greedy, {**favoured, "repetition_penalty": 1.8}, greedy])
    assert mixed[0]["output_ids"] == mixed[2]["output_ids"] == plain
    assert mixed[1]["output_ids"] != plain
