"""The MoE path on CUDA: worker_proc.fused_moe's compiled Triton kernels (the aligned grouped GEMMs and
worker_proc.moe_pairs's per-pair kernels) against the grouped torch path, inside a CUDA graph, and the tiny MoE
models in bf16 against HF transformers. Skipped without a CUDA GPU.

Tolerance, bf16 (as tests/test_gpu.py): relative L2 error of the experts' output, and of our logits against HF
in float32 on the same bf16-rounded weights, at most REL_TOL."""

from __future__ import annotations

import pytest
import torch

from worker_proc.layers import SiluAndMul
from worker_proc.moe import Routing, grouped_experts, route

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REL_TOL = 3e-2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def experts_case(tokens: int, experts: int, top_k: int, hidden: int, inter: int, offset: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=g) / inter**0.5).bfloat16()
    logits = torch.randn(tokens, experts + offset, device="cuda", generator=g)
    weights, ids = route(logits, Routing(experts + offset, top_k, renormalize=True, round_weights=False))
    return x, w13, w2, weights, ids - offset


@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("offset", [0, 3], ids=["all-local", "ep"])
def test_fused_moe_matches_grouped(tokens, offset):
    from worker_proc.fused_moe import aligned_experts

    x, w13, w2, weights, local = experts_case(tokens, 16, 4, 256, 192, offset)
    got = aligned_experts(x, w13, w2, weights, local)
    want = grouped_experts(x.float(), w13.float(), w2.float(), weights, local, SiluAndMul())
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < REL_TOL / 3


@pytest.mark.parametrize("tokens", [1, 2, 8, 16])
@pytest.mark.parametrize("offset", [0, 3], ids=["all-local", "ep"])
def test_pair_experts_matches_grouped(tokens, offset):
    """The per-pair kernels at the Qwen3-30B-A3B expert shape (128 experts, top 8, hidden 2048, intermediate 768)
    and a ragged one; two calls give the same bits (a fixed order of summation)."""
    from worker_proc.moe_pairs import pair_experts

    for experts, top_k, hidden, inter in ((128, 8, 2048, 768), (16, 4, 264, 200)):
        x, w13, w2, weights, local = experts_case(tokens, experts, top_k, hidden, inter, offset)
        got = pair_experts(x, w13, w2, weights, local)
        want = grouped_experts(x.float(), w13.float(), w2.float(), weights, local, SiluAndMul())
        assert got.dtype == torch.bfloat16 and rel_err(got, want) < REL_TOL / 3
        assert torch.equal(got, pair_experts(x, w13, w2, weights, local))


@pytest.mark.parametrize("tokens", [1, 16, 64, 128])
@pytest.mark.parametrize("offset", [0, 40], ids=["all-local", "ep"])
def test_align_one_program_equals_torch(tokens, offset):
    """The compiled one-program alignment gives the torch operators' bits at the Qwen3-30B-A3B routing (128
    experts, top 8; with `offset`, 88 local experts and some pairs on other ranks), up to ALIGN_KERNEL_PAIRS."""
    from worker_proc.fused_moe import align_one_program, align_torch, block_m_for, padded_length

    _, _, _, _, local = experts_case(tokens, 128 - offset, 8, 64, 64, offset)
    flat, block_m = local.flatten(), block_m_for(tokens)
    padded = padded_length(flat.numel(), 128 - offset, block_m)
    got = align_one_program(flat, 128 - offset, block_m, padded)
    want = align_torch(flat, 128 - offset, block_m, padded)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_kernel_matches_route(dtype):
    """moe_router.route against moe.route (torch) at the Qwen3-30B-A3B router (128 experts, top 8) and Mixtral's
    (8, top 2), renormalised and rounded as each: the same weights; the same ids where no two probabilities tie
    (float32 logits; bf16 logits may tie, and torch.topk leaves the order of ties unspecified)."""
    from worker_proc import moe_router

    g = torch.Generator(device="cuda").manual_seed(0)
    for routing in (Routing(128, 8, True, True), Routing(8, 2, True, False), Routing(128, 8, False, False)):
        logits = torch.randn(300, routing.num_experts, device="cuda", generator=g).to(dtype)
        want_w, want_ids = route(logits, routing)
        got_w, got_ids = moe_router.route(logits, routing.top_k, routing.renormalize, routing.round_weights)
        torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)
        if dtype == torch.float32:
            assert torch.equal(got_ids, want_ids)


@pytest.mark.parametrize("tokens", [1, 8])  # 16 experts, top 4: the per-pair path at 1, the aligned one at 8
def test_fused_moe_replays_in_a_cuda_graph(tokens):
    """Captured once, replayed on new tokens and new routing: equals the eager call."""
    from worker_proc.fused_moe import fused_experts

    x, w13, w2, weights, local = experts_case(tokens, 16, 4, 256, 192, 0)
    static = [x.clone(), weights.clone(), local.clone()]
    fused_experts(static[0], w13, w2, static[1], static[2], 16)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(static[0], w13, w2, static[1], static[2], 16)
    x2, _, _, weights2, local2 = experts_case(tokens, 16, 4, 256, 192, 0, seed=1)
    for dst, src in zip(static, (x2, weights2, local2), strict=True):
        dst.copy_(src)
    graph.replay()
    torch.testing.assert_close(out, fused_experts(x2, w13, w2, weights2, local2, 16), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_moe_models_bf16_match_hf(tmp_path, kind):
    from model_harness import greedy
    from test_moe_models import tiny_config
    from transformers import AutoModelForCausalLM

    from radixserve.model_files import load_hf_config
    from worker_proc.weights import load_model

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p)).bfloat16().float())
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, load_hf_config(tmp_path), "safetensors", torch.bfloat16, "cuda")
    prompt = torch.randint(0, 251, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    logits, tokens = greedy(model, [prompt], 6)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens[0][:-1]])).logits[0, len(prompt) - 1:]
    assert rel_err(logits[:, 0].cpu(), ref) < REL_TOL
