"""FP8 on the CPU: the loaders of both FP8 checkpoint layouts (HF's block-scaled `fp8`, compressed-tensors per
channel and per tensor) against the dequantized reference, with TP 2 over gloo; an FP8 KV cache on the torch
backend against the model's dtype; the start errors that name their option. The GPU side is test_gpu_quant.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from model_harness import RaggedRunner, greedy
from safetensors.torch import save_file
from test_models import STEPS, _free_port, prompts, random_hf_model, tiny_config

from radixserve.config import FlagError, ServerArgs
from radixserve.model_files import load_hf_config, resolve_model
from worker_proc import batch_invariant, fp8, parallel
from worker_proc.attention.base import LayerAttention
from worker_proc.attention.torch_backend import TorchBackend
from worker_proc.fp8_weights import scheme_of
from worker_proc.kv_cache import KVCache
from worker_proc.layers import RowParallelLinear, _ColumnLinear
from worker_proc.weights import load_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = 32  # the test's weight_block_size: several blocks per weight of the tiny models

LAYOUTS = {
    "hf-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]},
    "ct-channel": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                   "config_groups": {"group_0": {"targets": ["Linear"],
                                                 "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                                 "input_activations": {"num_bits": 8, "type": "float",
                                                                       "strategy": "token", "dynamic": True}}}},
    "ct-tensor": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                  "config_groups": {"group_0": {"targets": ["Linear"],
                                                "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
                                                "input_activations": {"num_bits": 8, "type": "float",
                                                                      "strategy": "tensor", "dynamic": False}}}},
}


def quantize(w: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, the checkpoint's scale tensor, the dequantized float32 weight), as the layout stores them."""
    n, k = w.shape
    if layout == "hf-block":
        nb, kb = -(-n // BLOCK), -(-k // BLOCK)
        padded = torch.zeros(nb * BLOCK, kb * BLOCK)
        padded[:n, :k] = w
        amax = padded.view(nb, BLOCK, kb, BLOCK).abs().amax(dim=(1, 3))
        scale = amax / fp8.FP8_MAX
        full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]
    elif layout == "ct-channel":
        scale = w.abs().amax(dim=1, keepdim=True) / fp8.FP8_MAX
        full = scale.expand(n, k)
    else:
        scale = (w.abs().amax() / fp8.FP8_MAX).reshape(1)
        full = scale.expand(n, k)
    q = fp8.to_fp8(w / full)
    return q, scale, q.float() * full


def write_checkpoints(hf_dir: str, layout: str, out: Path) -> tuple[str, str]:
    """(the FP8 checkpoint of the model in `hf_dir`, its dequantized float32 twin) as HF directories."""
    tensors = dict(load_model_tensors(hf_dir))
    quantized, reference = {}, {}
    for name, t in tensors.items():
        if name.split(".")[-2] in LINEARS and name.endswith(".weight"):
            q, scale, deq = quantize(t.float(), layout)
            quantized[name] = q
            quantized[name[: -len("weight")] + ("weight_scale_inv" if layout == "hf-block" else "weight_scale")] = scale
            if layout == "ct-tensor":  # a static activation scale, which the loader skips
                quantized[name[: -len("weight")] + "input_scale"] = torch.tensor([0.01])
            reference[name] = deq
        else:
            quantized[name] = reference[name] = t.float().contiguous()
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    dirs = []
    for kind, weights, qc in (("fp8", quantized, LAYOUTS[layout]), ("ref", reference, None)):
        d = out / f"{layout}-{kind}"
        d.mkdir()
        save_file(weights, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**config, **({"quantization_config": qc} if qc else {})}))
        dirs.append(str(d))
    return dirs[0], dirs[1]


def load_model_tensors(model_dir: str):
    from worker_proc.weights import iter_safetensors

    return iter_safetensors(model_dir)


def ours(model_dir: str) -> torch.nn.Module:
    return load_model(model_dir, load_hf_config(model_dir), "safetensors", torch.float32, "cpu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """layout -> (FP8 checkpoint, dequantized reference) of a tiny Llama (biases, GQA), and "hf": its float one."""
    root = tmp_path_factory.mktemp("fp8")
    hf_dir = root / "hf"
    random_hf_model(tiny_config("llama"), 0, hf_dir)
    return {"hf": str(hf_dir), **{layout: write_checkpoints(str(hf_dir), layout, root) for layout in LAYOUTS}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_checkpoint_equals_the_dequantized_reference(checkpoints, layout):
    """Every linear of an FP8 checkpoint is loaded as e4m3 weights + scales (nothing dequantized at load), and
    the model's greedy tokens and logits are the float model's with the dequantized weights."""
    fp8_dir, ref_dir = checkpoints[layout]
    model = ours(fp8_dir)
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == fp8.FP8 and layer.mlp.down_proj.weight.dtype == fp8.FP8
    assert model.lm_head.weight.dtype == torch.float32
    logits, tokens = greedy(model, prompts(), STEPS)
    ref_logits, ref_tokens = greedy(ours(ref_dir), prompts(), STEPS)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def _tp_rank(rank: int, init: str, model_dir: str, batch: list[list[int]], out: str) -> None:
    torch.set_num_threads(1)
    parallel.init_tp(rank, 2, init, "gloo")
    try:
        logits, tokens = greedy(ours(model_dir), batch, 4)
        if rank == 0:
            torch.save({"logits": logits, "tokens": tokens}, out)
    finally:
        parallel.destroy_tp()


@pytest.mark.long
def test_fp8_checkpoint_tensor_parallel(checkpoints, tmp_path):
    """2 ranks over gloo load their shards of the block scales (rows of q/k/v and gate/up, columns of o/down)
    and equal the dequantized reference on one rank."""
    fp8_dir, ref_dir = checkpoints["hf-block"]
    out = tmp_path / "tp2.pt"
    mp.spawn(_tp_rank, args=(f"tcp://127.0.0.1:{_free_port()}", fp8_dir, prompts(), str(out)), nprocs=2)
    tp2 = torch.load(out)
    logits, tokens = greedy(ours(ref_dir), prompts(), 4)
    assert tp2["tokens"] == tokens
    torch.testing.assert_close(tp2["logits"], logits, atol=1e-4, rtol=0)


def test_kv_scales_and_input_scales_of_a_checkpoint(checkpoints, tmp_path):
    """Per-layer k/v scales are kept for an FP8 KV cache; static input scales are skipped."""
    fp8_dir, _ = checkpoints["ct-tensor"]
    d = tmp_path / "kv"
    d.mkdir()
    (d / "config.json").write_text((Path(fp8_dir) / "config.json").read_text())
    tensors = dict(load_model_tensors(fp8_dir))
    tensors["model.layers.1.self_attn.k_scale"] = torch.tensor(0.5)
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor(0.25)
    save_file(tensors, str(d / "model.safetensors"))
    assert ours(str(d)).kv_scales == {1: [0.5, 0.25]}


def test_fp8_kv_cache_agrees_with_the_model_dtype(checkpoints):
    """A tiny bf16 model on the torch backend, teacher-forced over one sequence: the top-1 token with K/V stored in
    e4m3 equals the one with bf16 K/V at >= 95% of the positions whose bf16 top-1 leads by more than a twentieth
    of the logits' spread (a random model's near ties flip with any rounding: over four sequences the raw agreement
    ran 0.91-0.98, the kept positions' 0.98-1.0), those being >= 3/4 of all; with scales 1.0 and with per-layer
    scales (K / scale written, read back times scale). Both through the backend's torch attention (the CPU kernels
    read only a bf16 cache: on the bf16 side they would add their own rounding to a comparison of the dtypes)."""
    model_dir = checkpoints["hf"]
    model = load_model(model_dir, load_hf_config(model_dir), "safetensors", torch.bfloat16, "cpu")
    seq = torch.randint(0, 251, (72,), generator=torch.Generator().manual_seed(0)).tolist()
    tops = {}
    for name, dtype, scales in (("bf16", torch.bfloat16, None), ("fp8", fp8.FP8, None),
                                ("fp8-scaled", fp8.FP8, {i: [2.0, 0.5] for i in range(model.num_layers)})):
        runner = RaggedRunner(model, max_reqs=1, context_len=80)
        runner.kv = KVCache(model.num_layers, 81, model.num_kv_heads_local, model.head_dim, dtype, "cpu",
                            scales=scales, compute_dtype=torch.bfloat16)
        runner.attn = TorchBackend(runner.kv, model.num_q_heads_local, model.head_dim, model.attention_layers)
        runner.attn.has_kernels = False
        with torch.inference_mode():
            runner.step([0], [seq[:8]])
            tops[name] = torch.stack([runner.step([0], [[t]]).float().flatten() for t in seq[8:]])
    assert runner.kv.k[0].dtype == fp8.FP8 and runner.kv.k[0][1:73].float().abs().sum() > 0
    lead = tops["bf16"].topk(2, dim=-1).values
    clear = lead[:, 0] - lead[:, 1] > 0.05 * tops["bf16"].std(-1)
    assert clear.float().mean() >= 0.75
    for name in ("fp8", "fp8-scaled"):
        agree = (tops[name].argmax(-1) == tops["bf16"].argmax(-1))[clear].float().mean().item()
        assert agree >= 0.95, f"{name}: top-1 agreement {agree:.2f} where bf16's top-1 leads clearly"


MAX_PERPLEXITY_LOSS = 1.08  # FP8 / bf16 perplexity of SmolLM2-135M on PASSAGE: a bound, not the +2% target
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs each evening at dusk, carrying a small can of oil and a cloth "
    "for the lens. From the gallery he could see the whole bay: the fishing boats coming home, the gulls circling "
    "over the harbour wall, and the long grey line of the breakwater where the waves broke white in winter. He "
    "kept a logbook of the weather, writing down the wind, the height of the tide and the ships that passed, and "
    "over thirty years the pages filled a shelf in the kitchen below. When the light was finally automated, the "
    "engineers who came to fit the new lamp asked him what he would miss. He thought for a while and said that "
    "it was not the light itself but the hour before it, when the sea turned from blue to silver and the first "
    "lamps came on in the town across the water, one window at a time.")


@pytest.mark.long
def test_fp8_perplexity_against_bf16():
    """SmolLM2-135M (the default model) in bf16 on a fixed passage, against the same model with every linear run
    as the GPU runs it: weights e4m3 per output channel, activations e4m3 per token, fp8.scaled_mm (torch's
    _scaled_mm, which the CPU build has too). The issue's target is +2%; this 135M model loses more than that to
    e4m3 weights (docs/benchmarks.md has the figures), so the bound here is MAX_PERPLEXITY_LOSS."""
    from transformers import AutoTokenizer

    model_dir = resolve_model(None)
    ids = AutoTokenizer.from_pretrained(model_dir)(PASSAGE)["input_ids"]
    model = load_model(model_dir, load_hf_config(model_dir), "safetensors", torch.bfloat16, "cpu")

    def perplexity() -> float:
        runner = RaggedRunner(model, max_reqs=1, context_len=len(ids))
        with torch.inference_mode():
            logits = runner.step([0], [ids], every_token=True)[:-1]
        return torch.exp(F.cross_entropy(logits.float(), torch.tensor(ids[1:]))).item()

    bf16 = perplexity()
    linears = [m for m in model.modules() if isinstance(m, (_ColumnLinear, RowParallelLinear))]
    for m in linears:
        q, scale = fp8.quantize_rows(m.weight.data)
        m.packed = lambda x, bias, q=q, scale=scale: fp8.scaled_mm(x, q, scale.view(1, -1), bias)
    emulated = perplexity()
    assert len(linears) == 4 * model.num_layers and len(ids) > 150
    assert bf16 < 40 and emulated <= MAX_PERPLEXITY_LOSS * bf16, f"bf16 {bf16:.3f}, FP8 {emulated:.3f}"


def test_bad_input_fails_naming_the_option(monkeypatch):
    class Config:
        quantization_config = {"quant_method": "awq"}

    with pytest.raises(ValueError, match="quant_method 'awq'"):
        scheme_of(Config(), None)
    Config.quantization_config = LAYOUTS["hf-block"]
    with pytest.raises(ValueError, match="--quantization int8"):
        scheme_of(Config(), "int8")
    with pytest.raises(FlagError, match="--quantization fp8"):
        ServerArgs(quantization="fp8", device="cpu")
    with pytest.raises(FlagError, match="--kv-cache-dtype"):
        ServerArgs(kv_cache_dtype="fp8_e5m2")
    model_dir = resolve_model(None)
    with pytest.raises(ValueError, match="--quantization fp8"):  # --device auto resolving to the CPU
        load_model(model_dir, load_hf_config(model_dir), "dummy", torch.bfloat16, "cpu", quantization="fp8")
    kv = KVCache(1, 4, 1, 16, fp8.FP8, "cpu", compute_dtype=torch.bfloat16)
    monkeypatch.setattr(batch_invariant, "ENABLED", True)
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8_e4m3"):
        TorchBackend(kv, 1, 16, [LayerAttention(0.25)])


def check_fp8_gemv() -> None:
    """The decode GEMV on an e4m3 weight with per-row scales == x (weight * scale)^T + bias in float32, rounded
    once: one row on CUDA cores, three on tensor cores (float16 there: see test_fused_interpreted.check_gemv)."""
    from worker_proc import gemv

    torch.manual_seed(0)
    for rows, n, k, cfg, dtype in ((1, 50, 64, gemv.Config(16, 32, 4, 1, False), torch.bfloat16),
                                   (3, 40, 96, gemv.Config(32, 64, 4, 2, True), torch.float16)):
        x, bias = torch.randn(rows, k, dtype=dtype), torch.randn(n, dtype=dtype)
        q, scale = fp8.quantize_rows(torch.randn(n, k))
        y = gemv.gemv(x, q, bias, cfg, scale=scale)
        ref = x.float() @ fp8.dequantize(q, scale, k).T + bias.float()
        torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=2**-7, atol=1e-2)
    print("fp8_gemv ok")


def check_quantize_tokens() -> None:
    """The per-token quantization kernel: quantize_tokens' scales exactly (rows of zeros, a ragged k past one
    block, a strided x), and every value back within half of x. Only that: the interpreter's own e4m3 rounding
    is off (it maps -126.9 to -64 and rounds ties up); test_gpu_quant.py compares the compiled kernel's values
    with torch's exactly."""
    torch.manual_seed(0)
    x = torch.randn(5, 5000 + 8, dtype=torch.bfloat16)[:, :5000] * 3
    x[2] = 0
    q, scale = fp8.quantize_tokens_triton(x)
    assert q.dtype == fp8.FP8 and torch.equal(scale, fp8.quantize_tokens(x)[1])
    assert ((q.float() * scale - x.float()).abs() <= 0.5 * x.float().abs()).all() and not q[2].float().any()
    print("quantize_tokens ok")


def check_fp8_kernels() -> None:
    """Both FP8 kernel checks in one child process (each child imports torch and triton again)."""
    check_fp8_gemv()
    check_quantize_tokens()
    print("fp8_kernels ok")


def test_fp8_kernels_interpreted():
    pytest.importorskip("triton")
    from test_fused_interpreted import run_interpreted

    run_interpreted("check_fp8_kernels", module="test_fp8")
