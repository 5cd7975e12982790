"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE with its shared expert, Mixtral) against HF transformers on
tiny random configs in float32: greedy tokens and logits; tensor- and expert-parallel ranks over gloo == one rank;
the grouped expert path against a per-token loop; configs the implementation does not honour fail at start."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from model_harness import assert_greedy_matches_hf, greedy, tp_worker
from test_models import _free_port, ours, prompts, random_hf_model
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from radixserve.model_files import load_hf_config
from worker_proc.layers import SiluAndMul
from worker_proc.models import build_model
from worker_proc.moe import Routing, grouped_experts, route
from worker_proc.weights import load_model

STEPS = 11
KINDS = ("qwen3_moe", "qwen2_moe", "mixtral")
_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=251,
               max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)


def tiny_config(kind: str):
    if kind == "qwen3_moe":  # renormalised top-k; layer 1 dense (mlp_only_layers)
        return Qwen3MoeConfig(**_COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                              head_dim=32)
    if kind == "qwen2_moe":  # shared expert; top-k not renormalised; every other layer sparse
        return Qwen2MoeConfig(**_COMMON, num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=3,
                              norm_topk_prob=False, decoder_sparse_step=2)
    return MixtralConfig(**_COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=4,
                         num_experts_per_tok=2)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    """kind -> (saved HF directory, the HF model with every parameter randomised)."""
    out = {}
    for i, kind in enumerate(KINDS):
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (str(path), random_hf_model(tiny_config(kind), 10 + i, path))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_matches_hf(tiny_moe, kind):
    model_dir, hf = tiny_moe[kind]
    assert_greedy_matches_hf(ours(model_dir), hf, prompts(), STEPS)


def test_layer_kinds(tiny_moe):
    """The dense / sparse layers and the shared expert are where the configs put them."""
    q3, q2 = ours(tiny_moe["qwen3_moe"][0]), ours(tiny_moe["qwen2_moe"][0])
    assert [hasattr(layer.mlp, "experts") for layer in q3.model.layers] == [True, False, True]
    assert [hasattr(layer.mlp, "experts") for layer in q2.model.layers] == [False, True, False, True]
    assert q2.model.layers[1].mlp.shared_expert is not None and q3.model.layers[0].mlp.shared_expert is None
    assert q3.model.layers[0].mlp.experts.w13.shape == (8, 64, 64)


@pytest.mark.parametrize("tp,ep", [(2, 1), (2, 2)], ids=["tp2", "ep2"])
def test_parallel_experts_match_one_rank(tiny_moe, tmp_path, tp, ep):
    """2 ranks over gloo, experts split tensor-parallel (ep 1) or whole experts per rank (ep 2) == 1 rank,
    with checkpoint and with dummy weights."""
    dirs = [tiny_moe[kind][0] for kind in KINDS]
    batch, out = prompts(), tmp_path / "par.pt"
    mp.spawn(tp_worker, args=(tp, f"tcp://127.0.0.1:{_free_port()}", dirs, batch, STEPS, str(out), "cpu", ep),
             nprocs=tp)
    par = torch.load(out)
    for model_dir in dirs:
        logits, tokens = greedy(ours(model_dir), batch, STEPS)
        assert par[model_dir]["tokens"] == tokens
        torch.testing.assert_close(par[model_dir]["logits"], logits, atol=1e-4, rtol=0)
        dummy = load_model(model_dir, load_hf_config(model_dir), "dummy", torch.float32, "cpu", seed=3)
        torch.testing.assert_close(par[model_dir]["dummy_logits"], greedy(dummy, batch, 2)[0], atol=1e-4, rtol=0)


def per_token_experts(x, w13, w2, weights, ids):
    """The definition, one token and one chosen expert at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if 0 <= e < w13.shape[0]:
                gate, up = (w13[e] @ x[t]).chunk(2)
                out[t] += weights[t, k] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def test_grouped_experts_equal_per_token_loop():
    """Experts with no tokens, one expert chosen by every token, and ids of another rank's experts (skipped)."""
    g = torch.Generator().manual_seed(0)
    x, w13 = torch.randn(9, 16, generator=g), torch.randn(5, 24, 16, generator=g)
    w2 = torch.randn(5, 16, 12, generator=g)
    logits = torch.randn(9, 8, generator=g)
    logits[:, 2] += 10  # every token picks expert 2
    weights, ids = route(logits, Routing(8, 3, renormalize=True, round_weights=False))
    local = ids - 1  # this rank holds experts 1..5: ids 0, 6, 7 are elsewhere
    got = grouped_experts(x, w13, w2, weights, local, SiluAndMul())
    torch.testing.assert_close(got, per_token_experts(x, w13, w2, weights, local), atol=1e-4, rtol=1e-4)
    assert torch.allclose(weights.sum(-1), torch.ones(9))
    assert torch.equal(grouped_experts(x[:0], w13, w2, weights[:0], local[:0], SiluAndMul()), x[:0])


def test_unhonoured_config_fails_at_start():
    config = tiny_config("mixtral")
    config.sliding_window = 16
    with pytest.raises(NotImplementedError, match="sliding_window=16"):
        build_model(config, torch.float32, "cpu")
    config = tiny_config("qwen3_moe")
    config.hidden_act = "gelu"
    with pytest.raises(NotImplementedError, match="gelu"):
        build_model(config, torch.float32, "cpu")
    config = tiny_config("qwen2_moe")
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(NotImplementedError, match="yarn"):
        build_model(config, torch.float32, "cpu")


def test_registry_by_model_type():
    from worker_proc.models import model_class

    for model_type, name in (("qwen3_moe", "Qwen3MoeForCausalLM"), ("mixtral", "MixtralForCausalLM")):
        assert model_class(SimpleNamespace(architectures=None, model_type=model_type)).__name__ == name


@pytest.mark.parametrize("name,params,active", [("qwen3-30b-a3b", 30.53e9, 3.35e9), ("mixtral-8x7b", 46.70e9, 12.88e9)])
def test_shipped_configs_build_and_floor_counts_experts_read(name, params, active):
    """The published configs build (on the meta device: shapes only) with their published parameter counts,
    and bench one-batch's floor reads the dense part plus the experts a step's tokens are expected to touch."""
    from pathlib import Path

    from radixserve.bench.one_batch import ModelShape

    config = load_hf_config(Path(__file__).resolve().parent.parent / "radixserve" / "model_configs" / name)
    with torch.device("meta"):
        model = build_model(config, torch.bfloat16, "meta")
    total = sum(p.numel() for p in model.parameters())
    assert total == pytest.approx(params, rel=1e-3)
    shape = ModelShape.of(config, {"dtype": "bfloat16", "weight_bytes": 2 * total, "num_params": total,
                                   "kv_bytes_per_token": 0})
    vocab = 2 * shape.vocab_params
    dense = shape.body_params - shape.expert_params
    routed = sum(m.experts.w13.numel() + m.experts.w2.numel() for m in model.modules() if hasattr(m, "experts"))
    assert shape.expert_params == routed
    assert shape.experts_read(1) == pytest.approx(shape.top_k)
    assert shape.top_k < shape.experts_read(64) < shape.num_experts
    one, _ = shape.step(1, 1, 0, 0)  # one token: its top_k experts in each MoE layer
    assert one == pytest.approx(2 * (dense + routed * shape.top_k / shape.num_experts + vocab / 2))
    assert dense + routed * shape.top_k / shape.num_experts + vocab == pytest.approx(active, rel=1e-2)
    many, _ = shape.step(100_000, 1, 0, 0)  # a long prefill touches every expert
    assert many == pytest.approx(2 * (shape.body_params + vocab / 2))


def test_ep_size_flag():
    from radixserve.config import FlagError, ServerArgs

    assert ServerArgs(tp_size=4, ep_size=2).ep_size == 2
    with pytest.raises(FlagError, match="--ep-size must divide --tp-size"):
        ServerArgs(tp_size=4, ep_size=3)
    with pytest.raises(FlagError, match="--ep-size 0"):
        ServerArgs(ep_size=0)


@pytest.mark.parametrize("parallel", [{}, {"tp_size": 2, "ep_size": 2}], ids=["tp1", "tp2-ep2"])
def test_engine_matches_hf(tiny_moe, parallel):
    """The Engine end to end (scheduler and worker processes, chunked prefill, a radix-cache hit) on Qwen2-MoE:
    HF's greedy tokens on one rank and under --tp-size 2 --ep-size 2."""
    from test_engine_models import PROMPTS, engine_greedy, hf_greedy

    model_dir, hf = tiny_moe["qwen2_moe"]
    assert engine_greedy(model_dir, **parallel) == [hf_greedy(hf, p) for p in PROMPTS]


def test_load_weights_names_a_missing_expert(tiny_moe):
    from worker_proc.weights import iter_safetensors

    model_dir, _ = tiny_moe["mixtral"]
    weights = dict(iter_safetensors(model_dir))
    model = build_model(load_hf_config(model_dir), torch.float32, "cpu")
    dropped = "model.layers.1.block_sparse_moe.experts.3.w3.weight"  # expert 3's up projection
    with pytest.raises(ValueError, match=r"never loaded: model\.layers\.1\.mlp\.experts\.w13\[\(3, 1\)\]"):
        model.load_weights((n, t) for n, t in weights.items() if n != dropped)
