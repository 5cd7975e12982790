"""Speculative decoding with a draft model (STANDALONE) on tiny random models in float32, through the offline
Engine: greedy tokens equal those without speculation across batch sizes, chunked prefill and radix hits (the
draft's KV pool shares the target's block table: draft_model.py), with a draft that agrees with the target
mostly (the target's weights, slightly perturbed: drafts accepted and rejected); a draft model of another
vocabulary fails at start, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_models import random_hf_model
from transformers import LlamaConfig

from radixserve import Engine
from radixserve.config import ServerArgs

VOCAB = 251
CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True, num_hidden_layers=2)
# Prompts of 5-50 tokens (chunked prefill: 16 a step), two sharing a prefix (a radix hit).
PROMPTS = [[(7 * i + 3 * j * j) % VOCAB for j in range(5 + 15 * i)] for i in range(4)]
PROMPTS.append(PROMPTS[3][:30] + [5, 6, 7])
GREEDY = {"temperature": 0, "max_new_tokens": 40}
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, max_total_tokens=4096, max_running_requests=8,
              chunked_prefill_size=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(target, draft): the draft is the target with noise added to its weights."""
    root = tmp_path_factory.mktemp("spec-models")
    target = random_hf_model(LlamaConfig(**CONFIG, vocab_size=VOCAB), 0, root / "target")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=gen))
    target.save_pretrained(root / "draft")
    return root / "target", root / "draft"


def test_standalone_greedy_tokens_equal_plain_decoding(models) -> None:
    target, draft = models
    with Engine(model_path=str(target), **ENGINE) as eng:
        reference = [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    with Engine(model_path=str(target), **ENGINE, speculative_algorithm="STANDALONE",
                speculative_draft_model_path=str(draft), speculative_num_draft_tokens=4) as eng:
        together = eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert [o["output_ids"] for o in together] == reference
        alone = [eng.generate(input_ids=PROMPTS[i], sampling_params=GREEDY) for i in (4, 0)]
        assert [o["output_ids"] for o in alone] == [reference[4], reference[0]]
        assert alone[0]["meta_info"]["cached_tokens"] > 0
        metas = [o["meta_info"] for o in together + alone]
    accepted = sum(m["spec_accept_token_num"] for m in metas)
    drafted = sum(m["spec_draft_token_num"] for m in metas)
    print(f"STANDALONE: {accepted} of {drafted} drafts accepted")
    assert 0 < accepted < drafted, (accepted, drafted)  # drafts accepted and drafts rejected


@pytest.mark.long
def test_the_target_as_its_own_draft_is_always_right(models) -> None:
    """The draft's KV of every accepted token, the last draft's included, is in place at the next round: with the
    target as its own draft every draft is accepted (k + 1 tokens per verify step), also after a radix hit."""
    target, _ = models
    with Engine(model_path=str(target), **ENGINE, speculative_algorithm="STANDALONE",
                speculative_draft_model_path=str(target), speculative_num_draft_tokens=4) as eng:
        outs = eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        outs.append(eng.generate(input_ids=PROMPTS[3], sampling_params=GREEDY))
    for o in outs:
        meta = o["meta_info"]
        assert meta["spec_accept_token_num"] == meta["spec_draft_token_num"] > 0, meta


def test_a_draft_model_of_another_vocabulary_fails_at_start(tmp_path) -> None:
    from worker_proc.draft_model import DraftModel

    random_hf_model(LlamaConfig(**CONFIG, vocab_size=VOCAB + 1), 0, tmp_path)
    args = ServerArgs(speculative_algorithm="STANDALONE", speculative_draft_model_path=str(tmp_path))
    with pytest.raises(ValueError, match="vocabulary has 252 tokens, the target's 251"):
        DraftModel(args, torch.float32, torch.device("cpu"), VOCAB)
