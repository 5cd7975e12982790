"""CPU quantized linear layers (worker_proc/cpu_quant.py): the kernels and a model's greedy tokens against the
same weights dequantized to float (and from cpu_kernels.q8_rows() rows, x quantized per row and block of 32 to
int8 and back, as the kernels quantize it), the default model's GGUF blocks as the file holds them, perplexity of
a fixed text (bf16 expanded / Q4_1 kept / int8), start-up errors that name the flag, and the default for a GGUF
file (its blocks kept where `--quantization gguf` runs, else expanded)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_harness import RaggedRunner, greedy
from test_models import prompts, random_hf_model, tiny_config

from radixserve import Engine
from radixserve.bench.serve import WEIGHT_DTYPES
from radixserve.config import FlagError, ServerArgs
from radixserve.model_files import load_hf_config, resolve_model
from worker_proc import cpu_kernels
from worker_proc.cpu_quant import (
    QuantLinear,
    QuantWeight,
    gguf_layer_weights,
    gguf_weight,
    install_quantized,
    int8_layer_weights,
    linear_layers,
    quantize_cpu_linears,
    quantize_int8,
    resolve_quantization,
)
from worker_proc.layers import ParallelLMHead, pack_cpu_linears
from worker_proc.weights import load_model

needs_cpu_kernels = pytest.mark.skipif(cpu_kernels.library() is None,
                                       reason="cpu_kernels needs AVX512-BF16 and a C compiler")
# Where a GGUF file keeps its blocks without --quantization (resolve_quantization).
BLOCKS_BY_DEFAULT = cpu_kernels.library() is not None and cpu_kernels.q8_rows() > 0
TEXT = Path(__file__).with_name("data") / "perplexity.txt"
CPU = torch.device("cpu")


def quant_weight(w: torch.Tensor, form: str) -> QuantWeight:
    """int8 as --quantization int8 makes it, or GGUF's blocks as the gguf package writes them; the GGUF codes
    dequantize to exactly what the gguf package reads back."""
    if form == "int8":
        return quantize_int8(w)
    kind = gguf.GGMLQuantizationType[form]
    raw = gguf.quants.quantize(w.float().numpy(), kind)
    qw = gguf_weight(raw, form)
    assert np.array_equal(qw.dequantize().numpy(), gguf.quants.dequantize(raw, kind))
    return qw


def kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x [rows, k] in float32 as the quantized kernels multiply it: as it is for fewer than q8_rows() rows (or
    none), else each row quantized per block of 32 columns to int8, q = round(x / s) with s = max |x| / 127 (a
    block of zeros: 0), and back to q * s."""
    x = x.float()
    rows, k = x.shape
    if not cpu_kernels.q8_rows() or rows < cpu_kernels.q8_rows() or k % 32:
        return x
    blocks = x.view(rows, k // 32, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(blocks / scale).clamp(-127, 127), 0)
    return (q * scale).view(rows, k)


@needs_cpu_kernels
@pytest.mark.parametrize("form", ["int8", "Q8_0", "Q4_0", "Q4_1"])
def test_kernel_equals_dequantized_matmul(form):
    """x W^T (+ bias) for the dequantized W and x as the kernel reads it (kernel_input), within one bf16
    rounding (against x unquantized, 60-400 times this tolerance off): 1-9 rows (partial row tiles), 70 output columns
    (a partial block of 32), rows of x with a stride; each row bit for bit whatever the other rows are."""
    g = torch.Generator().manual_seed(0)
    n, k = 70, 96
    qw = quant_weight(torch.randn(n, k, generator=g) * 0.05, form)
    linear, w = QuantLinear(qw), qw.dequantize().double()
    bias = torch.randn(n, generator=g).bfloat16()
    wide = torch.randn(9, k + 3, generator=g).bfloat16()
    other = torch.randn(9, k, generator=g).bfloat16()
    for m in (1, 2, 4, 5, 9):
        for b in (None, bias):
            got = linear(wide[:m, :k], b)
            want = kernel_input(wide[:m, :k]).double() @ w.T + (0 if b is None else b.double())
            assert got.dtype == torch.bfloat16 and got.shape == (m, n)
            torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=1e-5)
            # a row's result does not depend on the others (one row tile: unpacked as read; several: unpacked once)
            others = torch.cat([other[:m - 1], wide[m - 1:m, :k]])
            assert torch.equal(got[-1:], linear(others, b)[-1:])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny random Llama (biases, a tied LM head) saved as an HF directory."""
    path = tmp_path_factory.mktemp("llama")
    random_hf_model(tiny_config("llama"), 0, path)
    return str(path)


@needs_cpu_kernels
@pytest.mark.parametrize("form", ["int8", "gguf"])
def test_greedy_equals_dequantized_reference(tiny_llama, form):
    """A model with quantized layers gives the greedy tokens of the same model whose layers compute F.linear in
    float32 with the dequantized weights and x as the kernels read it (kernel_input; without that the int8 tokens
    differ), batch of 3, 4 tokens (as tests/test_models.py's packed-layout check, since one bf16 rounding apart, a
    random tiny model meets near-ties within a few more), and logits within a bf16 rounding. gguf: Q4_1 layers
    and a Q8_0 LM head, as the default model's file has them."""
    config = load_hf_config(tiny_llama)
    quantized = load_model(tiny_llama, config, "auto", torch.bfloat16, "cpu")
    if form == "int8":
        weights = int8_layer_weights(quantized)
    else:
        weights = {name: quant_weight(m.weight, "Q8_0" if isinstance(m, ParallelLMHead) else "Q4_1")
                   for name, m in linear_layers(quantized).items()}
    reference = load_model(tiny_llama, config, "auto", torch.bfloat16, "cpu")
    for name, module in linear_layers(reference).items():
        if name in weights:
            w = weights[name].dequantize()
            module.packed = lambda x, b, w=w: F.linear(kernel_input(x.reshape(-1, x.shape[-1])), w, None if b is None
                                                       else b.float()).bfloat16().reshape(*x.shape[:-1], -1)
    install_quantized(quantized, weights)
    assert quantized.model.layers[0].mlp.down_proj.weight.numel() == 0  # the bf16 copy is freed
    batch = prompts(3)
    want_logits, want = greedy(reference, batch, 3)
    got_logits, got = greedy(quantized, batch, 3)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=want_logits.abs().max().item() / 64)


def perplexity(model: torch.nn.Module, ids: list[int]) -> float:
    logits = RaggedRunner(model, max_reqs=1, context_len=len(ids) + 1).step([0], [ids], every_token=True)
    return math.exp(F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item())


@needs_cpu_kernels
def test_gguf_rows_of_q_and_k_unpermuted():
    """llama.cpp stores q / k rows permuted (its convert_hf_to_gguf.py's permute); `heads` undoes it."""
    heads, n, k = 4, 32, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    permuted = w.reshape(heads, 2, n // heads // 2, k).transpose(1, 2).reshape(n, k)
    kind = gguf.GGMLQuantizationType.Q8_0
    got = gguf_weight(gguf.quants.quantize(permuted.numpy(), kind), "Q8_0", heads).dequantize()
    assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind)))


@pytest.mark.long  # about 10 s of CPU time on the default model
@needs_cpu_kernels
@torch.inference_mode()
def test_default_model_blocks_and_perplexity():
    """The default model's GGUF blocks, read as they are, are every linear layer of the file (the tied LM head's
    Q8_0 too), equal to its bf16 expansion once rounded; the perplexity of a fixed text with Q4_1 kept and with
    int8 is within 2% of the bf16 expansion's (packed as a bf16 server runs it; docs/quantization.md has the
    figures)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model(None)
    config = load_hf_config(model_dir)
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT.read_text())["input_ids"]
    model = load_model(model_dir, config, "auto", torch.bfloat16, "cpu")
    blocks, int8 = gguf_layer_weights(model, model_dir, config), int8_layer_weights(model)
    layers = linear_layers(model)
    assert set(blocks) == set(layers) and {qw.bits for qw in blocks.values()} == {4, 8}
    for name, qw in blocks.items():
        assert torch.equal(qw.dequantize().bfloat16(), layers[name].weight), name
    pack_cpu_linears(model)
    ppl = {"bf16": perplexity(model, ids)}
    install_quantized(model, int8)
    ppl["int8"] = perplexity(model, ids)
    install_quantized(model, blocks)
    ppl["Q4_1"] = perplexity(model, ids)
    print("perplexity", {k: round(v, 3) for k, v in ppl.items()})
    assert ppl["Q4_1"] <= 1.02 * ppl["bf16"] and ppl["int8"] <= 1.02 * ppl["bf16"]


@needs_cpu_kernels
def test_log_names_the_activation_path(tiny_llama, caplog, monkeypatch):
    """The start log says from how many rows activations are quantized, or warns that they never are (a CPU
    without AVX512-VNNI: nothing falls back to the slower path without a line in the log)."""
    config = load_hf_config(tiny_llama)
    line, _, _ = quantize_cpu_linears(load_model(tiny_llama, config, "auto", torch.bfloat16, "cpu"), "int8",
                                      tiny_llama, config)
    assert ("quantized per row to int8" in line) == bool(cpu_kernels.q8_rows())
    monkeypatch.setattr(cpu_kernels, "q8_rows", lambda: 0)
    with caplog.at_level("WARNING", logger="radixserve.worker"):
        line, _, _ = quantize_cpu_linears(load_model(tiny_llama, config, "auto", torch.bfloat16, "cpu"), "int8",
                                          tiny_llama, config)
    assert "lacks AVX512-VNNI" in caplog.text and "quantized per row" not in line


def test_start_errors_name_the_flag(tiny_llama):
    with pytest.raises(FlagError, match="--quantization int8 runs on the CPU"):
        ServerArgs(quantization="int8", device="cuda")
    with pytest.raises(FlagError, match="--quantization"):
        ServerArgs(quantization="int4")
    config = load_hf_config(tiny_llama)
    cases = [({"quantization": "int8"}, torch.device("cuda"), torch.bfloat16, "--quantization int8 runs on the CPU"),
             ({"quantization": "int8", "dtype": "float32"}, CPU, torch.float32,
              "--quantization int8 computes in bfloat16"),
             ({"quantization": "gguf"}, CPU, torch.bfloat16, "--quantization gguf keeps a GGUF file's blocks")]
    for flags, device, dtype, message in cases:
        with pytest.raises(ValueError, match=message):
            resolve_quantization(ServerArgs(**flags), device, dtype, tiny_llama, config)
    assert resolve_quantization(ServerArgs(), CPU, torch.bfloat16, tiny_llama, config) is None  # not a GGUF file


# A config whose row-parallel layers' inputs (6 x 16 = 96 attention columns) split into 48 per rank at tp 2.
SPLITS_BLOCKS_AT_TP2 = SimpleNamespace(num_attention_heads=6, head_dim=16, hidden_size=96, intermediate_size=256)


def test_default_model_without_the_flag(caplog):
    """The bundled GGUF file without --quantization: its blocks kept where the CPU's kernels run them (AVX512-BF16,
    a C compiler, AVX512-VNNI), else expanded; expanded for --quantization none (bench serve's bf16 baseline),
    --enable-deterministic-inference, --dtype float32, a CUDA device, or a --tp-size that splits the blocks (where
    an explicit --quantization gguf fails, naming the flag). One log line says which and why."""
    model_dir = resolve_model(None)
    config = load_hf_config(model_dir)

    def resolve(flags: dict, device: torch.device = CPU, dtype: torch.dtype = torch.bfloat16, hf_config=config):
        caplog.clear()
        with caplog.at_level("INFO", logger="radixserve.worker"):
            got = resolve_quantization(ServerArgs(**flags), device, dtype, model_dir, hf_config)
        assert len(caplog.records) == (0 if "quantization" in flags else 1)
        return got, caplog.text

    got, line = resolve({})
    assert got == ("gguf" if BLOCKS_BY_DEFAULT else "none")
    assert ("blocks are kept" if BLOCKS_BY_DEFAULT else "expanded to bfloat16") in line
    assert resolve(WEIGHT_DTYPES["bf16"]) == ("none", "")
    for flags, device, dtype, hf_config, why in (
            ({"enable_deterministic_inference": True}, CPU, torch.bfloat16, config, "--enable-deterministic-inference"),
            ({"dtype": "float32"}, CPU, torch.float32, config, "--quantization gguf computes in bfloat16"),
            ({}, torch.device("cuda"), torch.bfloat16, config, "--quantization gguf runs on the CPU"),
            ({"tp_size": 2}, CPU, torch.bfloat16, SPLITS_BLOCKS_AT_TP2, "48 input columns")):
        got, line = resolve(flags, device, dtype, hf_config)
        assert got == "none" and "expanded" in line, flags
        assert why in line or not BLOCKS_BY_DEFAULT, (flags, line)
    if cpu_kernels.library() is not None:
        with pytest.raises(ValueError, match="--quantization gguf: a rank's 48 input columns .* --tp-size"):
            resolve({"quantization": "gguf", "tp_size": 2}, hf_config=SPLITS_BLOCKS_AT_TP2)


@needs_cpu_kernels
def test_engine_start_error_names_the_flag():
    """A real start: the worker's error reaches the caller."""
    with pytest.raises(Exception, match="--quantization gguf keeps a GGUF file's blocks: --load-format dummy"):
        with Engine(quantization="gguf", load_format="dummy", max_total_tokens=1024):
            pass


@pytest.mark.skipif(not BLOCKS_BY_DEFAULT, reason="this CPU keeps no GGUF blocks by default (it needs AVX512-BF16, "
                    "AVX512-VNNI and a C compiler): the file is expanded")
def test_engine_serves_the_default_models_own_blocks_by_default():
    """No flag: the bundled Q4_1 file's blocks, as /get_server_info's worker section says (a q / k row permutation
    or a name mapping gone wrong would garble the answer)."""
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    with Engine(max_total_tokens=1024, max_running_requests=4) as eng:
        out = eng.generate(question, {"temperature": 0, "max_new_tokens": 8})
        worker = eng.server_info()["worker"]
    assert (worker["dtype"], worker["weight_dtype"]) == ("bfloat16", "Q4_1+Q8_0")
    assert "Paris" in out["text"]
