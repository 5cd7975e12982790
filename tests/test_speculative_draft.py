"""Speculative decoding with a draft model (STANDALONE) and an EAGLE-3 head (EAGLE3) on tiny random models in
float32, through the offline Engine: greedy tokens equal those without speculation across batch sizes, chunked
prefill and radix hits (the drafts' KV pools share the target's block table: draft_model.py), with drafts accepted
and rejected; a draft of another vocabulary or hidden size fails at start, saying why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
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
def reference(models) -> list[list[int]]:
    with Engine(model_path=str(models[0]), **ENGINE) as eng:
        return [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


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


def _check_spec_run(target: Path, reference: list[list[int]], **flags) -> tuple[int, int]:
    """All prompts at once, then two alone (one a radix hit): the tokens of plain decoding; (accepted, drafted)."""
    with Engine(model_path=str(target), **ENGINE, **flags) as eng:
        together = eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert [o["output_ids"] for o in together] == reference
        alone = [eng.generate(input_ids=PROMPTS[i], sampling_params=GREEDY) for i in (4, 0)]
        assert [o["output_ids"] for o in alone] == [reference[4], reference[0]]
        assert alone[0]["meta_info"]["cached_tokens"] > 0
        metas = [o["meta_info"] for o in together + alone]
    accepted = sum(m["spec_accept_token_num"] for m in metas)
    drafted = sum(m["spec_draft_token_num"] for m in metas)
    print(f"{flags['speculative_algorithm']}: {accepted} of {drafted} drafts accepted")
    return accepted, drafted


def test_standalone_greedy_tokens_equal_plain_decoding(models, reference) -> None:
    accepted, drafted = _check_spec_run(models[0], reference, speculative_algorithm="STANDALONE",
                                        speculative_draft_model_path=str(models[1]), speculative_num_draft_tokens=4)
    assert 0 < accepted < drafted, (accepted, drafted)  # drafts accepted and drafts rejected


def eagle3_head(path: Path, draft_token: int, hidden: int = 64, vocab: int = VOCAB, draft_vocab: int = 32,
                zero_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """A dummy EAGLE-3 head in the public layout (its tensors returned): random weights but a zero LM head, so it
    always drafts draft vocabulary id 0, which d2t maps to `draft_token` (the other ids to others)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
              "vocab_size": vocab, "draft_vocab_size": draft_vocab, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "max_position_embeddings": 512, "tie_word_embeddings": False, "rope_theta": 10000.0,
              "eagle_config": {"eagle_aux_hidden_state_layer_ids": [-1, 0, 1]}}
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return 0.1 * torch.randn(shape, generator=gen)
    h = hidden
    lm_head = torch.zeros(draft_vocab, h) if zero_lm_head else rand(draft_vocab, h)
    tensors = {"fc.weight": rand(h, 3 * h), "norm.weight": 1 + rand(h), "lm_head.weight": lm_head,
               "d2t": (torch.arange(draft_vocab) * 5 + draft_token) % vocab - torch.arange(draft_vocab),
               "t2d": torch.zeros(vocab, dtype=torch.bool)}
    for norm in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        tensors[f"midlayer.{norm}.weight"] = 1 + rand(h)
    for name, shape in (("self_attn.q_proj", (h, 2 * h)), ("self_attn.k_proj", (h // 2, 2 * h)),
                        ("self_attn.v_proj", (h // 2, 2 * h)), ("self_attn.o_proj", (h, h)),
                        ("mlp.gate_proj", (128, h)), ("mlp.up_proj", (128, h)), ("mlp.down_proj", (h, 128))):
        tensors[f"midlayer.{name}.weight"] = rand(*shape)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return tensors


def test_eagle3_head_matches_a_reference(tmp_path) -> None:
    """Our head on the public layout's tensors against the layer written out in plain torch: fc over the three
    target states, [norm(embedding) | norm(hidden)] into attention (RoPE, causal, grouped kv heads), the residual
    stream from the hidden state, the MLP, the final norm, the LM head and d2t."""
    import numpy as np

    from radixserve.model_files import load_hf_config
    from worker_proc.attention import ForwardMeta, backend_class
    from worker_proc.kv_cache import KVCache
    from worker_proc.models.eagle3 import Eagle3Head
    from worker_proc.weights import iter_safetensors

    w = eagle3_head(tmp_path, 7, zero_lm_head=False)
    head = Eagle3Head(load_hf_config(str(tmp_path)), torch.float32, "cpu")
    head.load_weights(iter_safetensors(tmp_path))
    n, h, heads, kv_heads, dim = 6, 64, 4, 2, 16
    embed = torch.nn.Embedding(VOCAB, h)
    ids, states = torch.randint(0, VOCAB, (n,)), torch.randn(n, 3 * h)
    req_to_token = torch.zeros((1, 16), dtype=torch.int32)
    req_to_token[0, :n] = torch.arange(1, n + 1)
    meta, positions, _ = ForwardMeta.for_positions(req_to_token, np.zeros(1, np.int64), np.zeros(1, np.int64),
                                                   np.array([n]))
    attn = backend_class("torch")(KVCache(1, 16, kv_heads, dim, torch.float32, "cpu"), heads, dim,
                                  head.attention_layers)
    attn.prepare(meta)
    with torch.no_grad():
        normed, nxt = head(ids, positions, states, attn, embed, True)
        drafts = head.draft_tokens(normed)

        def norm(x, name):
            return w[name] * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

        def rope(x):  # [n, heads, dim], HF's rotate_half
            inv = 1.0 / 10000.0 ** (torch.arange(0, dim, 2).float() / dim)
            ang = torch.cat([positions.float()[:, None] * inv] * 2, dim=-1)[:, None, :]
            return x * ang.cos() + torch.cat([-x[..., dim // 2:], x[..., :dim // 2]], dim=-1) * ang.sin()
        hidden = states @ w["fc.weight"].T
        x = torch.cat([norm(embed(ids), "midlayer.input_layernorm.weight"),
                       norm(hidden, "midlayer.hidden_norm.weight")], dim=-1)
        q = rope((x @ w["midlayer.self_attn.q_proj.weight"].T).view(n, heads, dim))
        k = rope((x @ w["midlayer.self_attn.k_proj.weight"].T).view(n, kv_heads, dim)).repeat_interleave(2, dim=1)
        v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(n, kv_heads, dim).repeat_interleave(2, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / dim**0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, h)
        residual = out @ w["midlayer.self_attn.o_proj.weight"].T + hidden
        y = norm(residual, "midlayer.post_attention_layernorm.weight")
        mlp = (torch.nn.functional.silu(y @ w["midlayer.mlp.gate_proj.weight"].T) *
               (y @ w["midlayer.mlp.up_proj.weight"].T)) @ w["midlayer.mlp.down_proj.weight"].T
        ref_next = mlp + residual
        ref_normed = norm(ref_next, "norm.weight")
        best = (ref_normed @ w["lm_head.weight"].T).argmax(-1)
    assert torch.allclose(nxt, ref_next, atol=1e-4) and torch.allclose(normed, ref_normed, atol=1e-4)
    assert drafts.tolist() == (best + w["d2t"][best]).tolist()


def test_eagle3_greedy_tokens_equal_plain_decoding(models, reference, tmp_path) -> None:
    """An EAGLE-3 head that drafts the target's most frequent output token: accepted where the target repeats it,
    rejected elsewhere; the tokens of plain decoding either way."""
    tokens = [t for out in reference for t in out]
    eagle3_head(tmp_path / "head", max(set(tokens), key=tokens.count))
    accepted, drafted = _check_spec_run(models[0], reference, speculative_algorithm="EAGLE3",
                                        speculative_draft_model_path=str(tmp_path / "head"),
                                        speculative_num_draft_tokens=4)
    assert 0 < accepted < drafted, (accepted, drafted)


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


@pytest.mark.parametrize("algorithm", ["STANDALONE", "EAGLE3"])
def test_drafters_skip_decode_steps_above_the_threshold(algorithm, models, reference, tmp_path) -> None:
    """Above --speculative-batch-size-threshold the drafter does not compute the plain decode steps (drafter.py):
    with the target as its own draft, drafts made after such steps read stale draft KV and some are rejected
    (with every step followed, all are accepted: the test above); the tokens stay those of plain decoding."""
    draft = models[0]
    if algorithm == "EAGLE3":
        tokens = [t for out in reference for t in out]
        eagle3_head(draft := tmp_path / "head", max(set(tokens), key=tokens.count))
    with Engine(model_path=str(models[0]), **ENGINE, speculative_algorithm=algorithm, speculative_num_draft_tokens=4,
                speculative_draft_model_path=str(draft), speculative_batch_size_threshold=2) as eng:
        # three requests end after 8 tokens: the other two go on at the threshold and speculate
        lengths = [40, 40, 8, 8, 8]
        outs = eng.generate(input_ids=PROMPTS, sampling_params=[{**GREEDY, "max_new_tokens": n} for n in lengths])
    assert [o["output_ids"] for o in outs] == [ref[:n] for ref, n in zip(reference, lengths)]
    accepted = sum(o["meta_info"].get("spec_accept_token_num", 0) for o in outs)  # absent: never verified
    drafted = sum(o["meta_info"].get("spec_draft_token_num", 0) for o in outs)
    assert drafted > 0
    if algorithm == "STANDALONE":
        assert accepted < drafted, (accepted, drafted)


def test_an_eagle3_head_for_another_hidden_size_fails_at_start(models, tmp_path) -> None:
    from radixserve.model_files import load_hf_config
    from worker_proc.eagle3_draft import Eagle3Draft
    from worker_proc.weights import load_model

    target = load_model(str(models[0]), load_hf_config(str(models[0])), "safetensors", torch.float32, "cpu")
    eagle3_head(tmp_path, 0, hidden=32)
    args = ServerArgs(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(tmp_path))
    with pytest.raises(ValueError, match="an EAGLE-3 head for hidden size 32, the target's is 64"):
        Eagle3Draft(args, torch.float32, torch.device("cpu"), target)


def test_a_draft_model_of_another_vocabulary_fails_at_start(tmp_path) -> None:
    from worker_proc.draft_model import DraftModel

    random_hf_model(LlamaConfig(**CONFIG, vocab_size=VOCAB + 1), 0, tmp_path)
    args = ServerArgs(speculative_algorithm="STANDALONE", speculative_draft_model_path=str(tmp_path))
    with pytest.raises(ValueError, match="vocabulary has 252 tokens, the target's 251"):
        DraftModel(args, torch.float32, torch.device("cpu"), VOCAB)
