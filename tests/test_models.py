"""Our Llama / Qwen2 / Qwen3 against HF transformers on tiny random models: logits, greedy tokens, TP, loading."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from model_harness import RaggedRunner, assert_greedy_matches_hf, greedy, hf_reference, tp_worker
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from radixserve.model_files import load_hf_config
from worker_proc import cpu_kernels, sampling
from worker_proc.layers import RotaryEmbedding, pack_cpu_linears, rope_parameters
from worker_proc.models import build_model, model_class
from worker_proc.weights import iter_safetensors, load_model

needs_cpu_kernels = pytest.mark.skipif(cpu_kernels.library() is None,
                                       reason="cpu_kernels needs AVX512-BF16 and a C compiler")
STEPS = 15  # decode steps after prefill: 16 greedy tokens
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=251, max_position_embeddings=128, rms_norm_eps=1e-6)  # odd vocab: TP pads it


def tiny_config(kind: str):
    if kind == "llama":  # biases everywhere, tied embeddings, llama3 rope scaling
        return LlamaConfig(**_COMMON, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                           tie_word_embeddings=True,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 32})
    if kind == "qwen2":  # one kv head: replicated over TP ranks
        return Qwen2Config(**_COMMON, num_key_value_heads=1, tie_word_embeddings=False)
    return Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)


def random_hf_model(config, seed: int, path: Path) -> torch.nn.Module:
    """The HF model of `config` with every parameter (biases, norms too) randomised, saved to `path`."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
    hf.generation_config.eos_token_id = None  # always generate the full length
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    """kind -> (saved HF directory, the HF model)."""
    out = {}
    for i, kind in enumerate(("llama", "qwen2", "qwen3")):
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (str(path), random_hf_model(tiny_config(kind), i, path))
    return out


def prompts(n: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 251, (length,), generator=gen).tolist() for length in (5, 11, 3)[:n]]


def ours(model_dir: str) -> torch.nn.Module:
    return load_model(model_dir, load_hf_config(model_dir), "safetensors", torch.float32, "cpu")




@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_matches_hf(tiny_models, kind):
    model_dir, hf = tiny_models[kind]
    assert_greedy_matches_hf(ours(model_dir), hf, prompts(), STEPS)


def test_chunked_prefill_in_a_mixed_batch(tiny_models):
    """A prompt prefilled in two chunks, the second batched with another request's decode, matches one shot."""
    model = ours(tiny_models["llama"][0])
    long, short = prompts(2)[1], prompts(1)[0]
    whole, _ = greedy(model, [long, short], 0)
    runner = RaggedRunner(model)
    with torch.inference_mode():
        runner.step([0, 1], [long[:4], short])
        next_short = int(whole[0, 1].argmax())
        chunked = runner.step([0, 1], [long[4:], [next_short]])
    torch.testing.assert_close(chunked[0], whole[0, 0], atol=1e-5, rtol=0)


def test_bfloat16_close_to_hf(tiny_models):
    model_dir, _ = tiny_models["qwen3"]
    model = load_model(model_dir, load_hf_config(model_dir), "auto", torch.bfloat16, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    prompt = prompts(1)[0]
    logits, tokens = greedy(model, [prompt], 3)
    torch.testing.assert_close(logits[:, 0], hf_reference(hf, prompt, tokens[0]), atol=0.05, rtol=0)


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_cpu_kernels)], ids=["onednn", "cpu_kernels"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])  # tied LM head (keeps the embedding) / separate one
def test_packed_cpu_linears_give_the_same_logits(tiny_models, kind, native):
    """Packed bf16 weights (what a CPU worker runs) give F.linear's greedy tokens, batch 1 and 3: oneDNN's
    layout bit for bit, cpu_kernels' up to float32 summation order (within one bf16 rounding of the logits)."""
    model_dir, _ = tiny_models[kind]
    plain = load_model(model_dir, load_hf_config(model_dir), "auto", torch.bfloat16, "cpu")
    packed = load_model(model_dir, load_hf_config(model_dir), "auto", torch.bfloat16, "cpu")
    count, _ = pack_cpu_linears(packed, native=native)
    if count == 0:
        pytest.skip("oneDNN's bf16 path is not available on this CPU")
    assert packed.model.layers[0].mlp.down_proj.weight.numel() == 0  # the plain copy is freed
    assert packed.lm_head.packed is not None and packed.model.embed_tokens.weight.numel() > 0
    for batch in (prompts(1), prompts(3)):
        want, want_tokens = greedy(plain, batch, 3)
        got, got_tokens = greedy(packed, batch, 3)
        assert got_tokens == want_tokens
        if native:
            torch.testing.assert_close(got, want, rtol=0, atol=want.abs().max().item() / 64)
        else:
            assert torch.equal(got, want)


@needs_cpu_kernels
@pytest.mark.parametrize("m", [1, 3, 8, 9, 37])
@pytest.mark.parametrize("n,k", [(64, 64), (45, 33), (3, 7), (100, 1)])  # ragged blocks, odd k, k = 1
def test_cpu_kernels_linear_matches_float32(m, n, k):
    """Every row of x and column of W lands where F.linear puts it, bias added once, within bf16 rounding
    of the float32 product; a strided x (a view of a wider tensor) reads the right elements."""
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    wide = torch.randn(m, k + 5, generator=g).bfloat16()
    x = wide[:, 2: 2 + k]
    packed = cpu_kernels.PackedLinear(w)
    for bias in (None, b):
        want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        got = packed(x, bias)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-3 * (1 + want.abs().max().item()))
    assert torch.equal(packed(x[:0], b), torch.empty(0, n, dtype=torch.bfloat16))


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+): a bind(0) elsewhere can't take it before rank 0
    binds it, which otherwise happens in the seconds spawn takes and sends rank 1 to a stranger's server."""
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def test_tensor_parallel_matches_tp1(tiny_models, tmp_path):
    """2 ranks over gloo (kv heads split for Llama, replicated for Qwen2; odd vocab padded) == 1 rank."""
    dirs = [tiny_models["llama"][0], tiny_models["qwen2"][0]]
    batch, out = prompts(), tmp_path / "tp2.pt"
    mp.spawn(tp_worker, args=(2, f"tcp://127.0.0.1:{_free_port()}", dirs, batch, STEPS, str(out)), nprocs=2)
    tp2 = torch.load(out)
    for model_dir in dirs:
        logits, tokens = greedy(ours(model_dir), batch, STEPS)
        torch.testing.assert_close(tp2[model_dir]["logits"], logits, atol=1e-4, rtol=0)
        assert tp2[model_dir]["tokens"] == tokens
        dummy = load_model(model_dir, load_hf_config(model_dir), "dummy", torch.float32, "cpu", seed=3)
        torch.testing.assert_close(tp2[model_dir]["dummy_logits"], greedy(dummy, batch, 2)[0], atol=1e-4, rtol=0)


def test_dummy_weights_from_config_alone(tmp_path):
    config = tiny_config("qwen3")
    config.architectures = ["Qwen3ForCausalLM"]
    config.save_pretrained(tmp_path)
    config = load_hf_config(tmp_path)

    def params(seed: int) -> dict[str, torch.Tensor]:
        return dict(load_model(tmp_path, config, "dummy", torch.float32, "cpu", seed=seed).state_dict())

    a, b, c = params(0), params(0), params(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.qkv_proj.weight"], c["model.layers.0.self_attn.qkv_proj.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(64))
    model = load_model(tmp_path, config, "dummy", torch.float32, "cpu", seed=0)
    assert torch.isfinite(greedy(model, prompts(), 2)[0]).all()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path, config, "auto", torch.float32, "cpu")
    with pytest.raises(ValueError, match="GGUF"):
        load_model(tmp_path, config, "gguf", torch.float32, "cpu")


def test_load_weights_rejects_missing_and_unknown(tiny_models):
    model_dir, _ = tiny_models["qwen2"]
    weights = dict(iter_safetensors(model_dir))
    model = build_model(load_hf_config(model_dir), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"never loaded: model\.layers\.1\.self_attn\.qkv_proj\.weight\[k\]"):
        model.load_weights((n, t) for n, t in weights.items() if n != "model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(KeyError, match="vision"):
        model.load_weights([*weights.items(), ("vision.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        model.load_weights([("model.norm.weight", torch.zeros(3))])


def test_registry():
    assert model_class(SimpleNamespace(architectures=None, model_type="qwen3")).__name__ == "Qwen3ForCausalLM"
    assert model_class(SimpleNamespace(architectures=["MistralForCausalLM"])).__name__ == "MistralForCausalLM"
    with pytest.raises(ValueError, match="unsupported model.*GPT2LMHeadModel"):
        model_class(SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2"))


def test_rope_config_forms_agree():
    """transformers 5 `rope_parameters` and the older `rope_theta` + `rope_scaling` give the same table."""
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    new = SimpleNamespace(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **scaling})
    old = SimpleNamespace(rope_theta=5e5, rope_scaling={"type": "llama3", **scaling})
    tables = [RotaryEmbedding(32, 256, rope_parameters(c), "cpu") for c in (new, old)]
    assert torch.equal(tables[0].cos, tables[1].cos)
    plain = RotaryEmbedding(32, 256, rope_parameters(SimpleNamespace(rope_theta=5e5)), "cpu")
    assert not torch.equal(plain.cos, tables[0].cos)
    with pytest.raises(NotImplementedError, match="yarn"):
        RotaryEmbedding(32, 8, rope_parameters(SimpleNamespace(rope_scaling={"rope_type": "yarn"})), "cpu")


def test_model_attributes(tiny_models):
    model = ours(tiny_models["qwen3"][0])
    assert (model.num_layers, model.num_q_heads_local, model.num_kv_heads_local, model.head_dim,
            model.vocab_size) == (2, 4, 2, 32, 251)


@needs_cpu_kernels
@pytest.mark.parametrize("hq,hkv,dim", [(9, 3, 64), (8, 8, 128), (16, 1, 32), (4, 2, 80)])
def test_cpu_kernels_paged_attention_matches_sdpa(hq, hkv, dim):
    """Paged attention rows (context read in place through req_to_token, scattered slots, lengths 0 to 300,
    req slots out of order, and six consecutive rows of one request as a verify or prefill step has them: the
    kernel's tasks take up to four such rows together) against float32 SDPA over the gathered context."""
    g = torch.Generator().manual_seed(hq * 100 + dim)
    slots, lens, req_slots = 2000, [1, 300, 17, 0, 64, *range(30, 36)], [3, 0, 4, 1, 2, *[5] * 6]
    k_cache = torch.randn(slots, hkv, dim, generator=g).bfloat16()
    v_cache = torch.randn(slots, hkv, dim, generator=g).bfloat16()
    req_to_token = torch.zeros(6, 320, dtype=torch.int32)
    for slot, n in zip(req_slots, lens):
        req_to_token[slot, :n] = torch.randperm(slots - 1, generator=g)[:n].int() + 1
    q = torch.randn(len(lens), hq, dim, generator=g).bfloat16()
    got = cpu_kernels.paged_attention(q, k_cache, v_cache, req_to_token, torch.tensor(req_slots, dtype=torch.int32),
                                      torch.tensor(lens, dtype=torch.int32), dim**-0.5)
    for b, (slot, n) in enumerate(zip(req_slots, lens)):
        if n == 0:
            assert torch.equal(got[b], torch.zeros(hq, dim, dtype=torch.bfloat16))
            continue
        idx = req_to_token[slot, :n].long()
        keys, vals = k_cache[idx].float().transpose(0, 1), v_cache[idx].float().transpose(0, 1)  # [Hkv, n, D]
        want = F.scaled_dot_product_attention(q[b].float()[:, None], keys.repeat_interleave(hq // hkv, 0),
                                              vals.repeat_interleave(hq // hkv, 0), scale=dim**-0.5)[:, 0]
        torch.testing.assert_close(got[b].float(), want, rtol=2**-7, atol=2e-3)


@needs_cpu_kernels
@pytest.mark.parametrize("rows,n", [(1, 576), (3, 100), (20, 64)])  # one row (no threads), ragged n, threaded rows
def test_cpu_kernels_add_rmsnorm_rounds_as_torch(rows, n):
    """The one-pass residual add + RMSNorm equals torch's bf16 ops (HF's order of rounding) to one bf16 ulp."""
    g = torch.Generator().manual_seed(rows * n)
    wide = torch.randn(rows, n + 3, generator=g).bfloat16()
    x, residual = wide[:, :n], torch.randn(rows, n, generator=g).bfloat16()
    weight = torch.randn(n, generator=g).bfloat16()

    def reference(h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()

    out, none = cpu_kernels.add_rmsnorm(x, weight, 1e-5)
    assert none is None
    torch.testing.assert_close(out, reference(x), rtol=2**-7, atol=0)
    out, summed = cpu_kernels.add_rmsnorm(x, weight, 1e-5, residual)
    assert torch.equal(summed, x + residual)
    torch.testing.assert_close(out, reference(summed), rtol=2**-7, atol=0)


def test_cpu_kernels_fall_back_to_onednn_without_a_compiler(tmp_path, tiny_models):
    """A compiler that fails (or none) leaves the worker on oneDNN's packed layout, with a warning naming why."""
    model_dir, _ = tiny_models["llama"]
    code = ("import logging, torch; logging.basicConfig()\n"
            "from worker_proc import cpu_kernels\n"
            "from worker_proc.layers import pack_cpu_linears\n"
            "from worker_proc.weights import load_model\n"
            "from radixserve.model_files import load_hf_config\n"
            f"m = load_model({str(model_dir)!r}, load_hf_config({str(model_dir)!r}), 'auto', torch.bfloat16, 'cpu')\n"
            "assert cpu_kernels.library() is None\n"
            "print('layout:', pack_cpu_linears(m)[1])\n")
    env = {**os.environ, "CC": "/bin/false", "RADIXSERVE_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "avx512_bf16" in Path("/proc/cpuinfo").read_text():
        assert "building cpu_kernels.c failed" in proc.stderr
    assert "layout: oneDNN's" in proc.stdout or "layout: \n" in proc.stdout


@needs_cpu_kernels
def test_cpu_kernels_prefill_attention_matches_sdpa(tiny_models, monkeypatch):
    """A bf16 model's ragged steps (a prompt in two chunks over its cached first half, a whole prompt beside it,
    then decode) with prefill attention in cpu_kernels and in SDPA: the same greedy tokens, logits within bf16
    noise."""
    from worker_proc.attention import torch_backend

    model_dir, _ = tiny_models["qwen3"]
    model = load_model(model_dir, load_hf_config(model_dir), "auto", torch.bfloat16, "cpu")
    a, b = prompts(2)

    def run() -> tuple[torch.Tensor, list[int]]:
        runner = RaggedRunner(model, max_reqs=2)
        with torch.inference_mode():
            runner.step([0], [a[: len(a) // 2]])
            logits = [runner.step([0, 1], [a[len(a) // 2:], b])]
            tokens = logits[-1].argmax(-1).tolist()
            for _ in range(3):
                logits.append(runner.step([0, 1], [[t] for t in tokens]))
                tokens = logits[-1].argmax(-1).tolist()
        return torch.stack(logits), tokens

    native = run()
    monkeypatch.setattr(torch_backend, "NATIVE_MAX_EXTEND", 0)
    sdpa = run()
    assert native[1] == sdpa[1]
    torch.testing.assert_close(native[0], sdpa[0], rtol=0, atol=sdpa[0].abs().max().item() / 32)


@needs_cpu_kernels
@pytest.mark.parametrize("rows,n", [(1, 1536), (3, 40), (20, 64)])
def test_cpu_kernels_silu_and_mul_rounds_as_torch(rows, n):
    """silu(gate) * up in one pass equals torch's bf16 F.silu(gate) * up to one bf16 ulp, large |gate| included."""
    g = torch.Generator().manual_seed(rows + n)
    x = (torch.randn(rows, 2 * n + 2, generator=g) * 4).bfloat16()[:, : 2 * n]  # a strided view
    x[0, :4] = torch.tensor([0.0, -100.0, 100.0, -3e4])
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_and_mul(x), F.silu(gate) * up, rtol=2**-7, atol=1e-6)


@needs_cpu_kernels
def test_cpu_kernels_argmax_picks_as_torch():
    """The greedy pick equals torch.argmax: random rows of a vocabulary's width and ragged ones, no rows, the first
    of tied maxima, a NaN above +inf (its first), a row of -inf, a strided view."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(3, 49152, generator=g), torch.randn(5, 33, generator=g), torch.randn(2, 1, generator=g),
            torch.randn(4, 80, generator=g)[:, :70], torch.randn(0, 8, generator=g),
            torch.randn(2, 40, generator=g).bfloat16()]  # (torch's own pick for any but float32)
    ties = torch.zeros(4, 100)
    ties[0, [5, 50]] = 1.0
    ties[1, [7, 90]], ties[1, 3] = float("nan"), float("inf")
    ties[2] = float("-inf")
    ties[3, 99] = 2.0
    for x in [*rows, ties]:
        assert torch.equal(sampling.argmax(x), x.argmax(dim=-1))
    assert sampling.argmax(ties).tolist() == [5, 7, 0, 99]


@needs_cpu_kernels
@pytest.mark.parametrize("q_heads,kv_heads,dim", [(9, 3, 64), (4, 4, 40)])  # dim / 2 not a multiple of 16
def test_cpu_kernels_rotary_store(q_heads, kv_heads, dim):
    """Rotary of q and k (strided views of one qkv projection) with the KV store: q returned, k and v at their
    slots, other slots untouched; the rotation equals the float32 one rounded once, to one bf16 ulp."""
    from worker_proc.kv_cache import KVCache

    g = torch.Generator().manual_seed(dim)
    tokens = 5
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, dim, generator=g).bfloat16()
    qk, v = qkv[:, : q_heads + kv_heads], qkv[:, q_heads + kv_heads:]
    angles = torch.randn(tokens, dim // 2, generator=g)
    cos, sin = angles.cos().bfloat16()[:, None], angles.sin().bfloat16()[:, None]
    slots = torch.tensor([7, 2, 9, 4, 11])
    cache = KVCache(1, 12, kv_heads, dim, torch.bfloat16, "cpu")
    q = cpu_kernels.rotary_store(qk, v, cos, sin, slots, cache.k[0], cache.v[0], q_heads)
    x1, x2 = qk.float().chunk(2, dim=-1)
    want = torch.cat((x1 * cos.float() - x2 * sin.float(), x2 * cos.float() + x1 * sin.float()), dim=-1).bfloat16()
    torch.testing.assert_close(q, want[:, :q_heads], rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(cache.k[0][slots], want[:, q_heads:], rtol=2**-7, atol=1e-6)
    assert torch.equal(cache.v[0][slots], v)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[slots] = False
    assert not cache.k[0][untouched].any() and not cache.v[0][untouched].any()
