"""FP8 on the GPU: the FP8 linear (Triton GEMV and _scaled_mm) against the dequantized reference, FP8 weights
(quantized at load, and both checkpoint layouts) and an FP8 KV cache through ModelRunner with FlashInfer and CUDA
graphs, FP8 with tp 2. Runs only where CUDA is available; the CPU side is tests/test_fp8.py.

Tolerances (relative L2 error of an output row against float32 on the dequantized weights):
  GEMV_TOL   the GEMV reads e4m3 weights and keeps x in bf16: only the bf16 output rounding and summation order;
  MM_TOL     _scaled_mm also rounds x per token to e4m3 (3 mantissa bits: up to 2^-4 relative per element).
A tiny random model's logits, teacher-forced, against the same model in bf16 (`compare`): the relative L2 error of
each row, how far below the reference's best logit our top-1 token is (the gap), and the share of positions whose
top-1 tokens agree. These models' logits are near ties (bf16 itself does not always pick float32's top-1), so
agreement is bounded loosely and the gap carries the check; the bounds are about twice what the same FP8
arithmetic gives emulated on the CPU on these models (docs/gpu.md, "FP8 weights and FP8 KV cache").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fp8 import write_checkpoints
from test_gpu import RESULTS, Driver, _report_results, prompts, runner_for, save_tiny, scenario  # noqa: F401

from worker_proc import fp8, gemv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs FP8 tensor cores (compute capability 8.9+)")]

GEMV_TOL = 1e-2
MM_TOL = 6e-2
FP8_WEIGHTS = {"rel_err": 0.35, "gap": 0.6}  # bounds of `compare`'s figures
FP8_KV = {"rel_err": 0.2, "gap": 0.4}
MIN_TOP1 = 0.7
TP_TIE = 0.1  # log-probability
SHAPES = [(6144, 4096), (28672, 4096), (4096, 4096), (4096, 14336)]  # Llama-3.1-8B: qkv, gate_up, o, down


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


@pytest.mark.parametrize("n,k", SHAPES)
def test_fp8_linear_matches_the_dequantized_reference(n, k):
    torch.manual_seed(0)
    w = (0.02 * torch.randn(n, k, device="cuda")).bfloat16()
    q, scale = fp8.quantize_rows(w)
    lin = fp8.Fp8Linear(q, scale, k)
    bias = torch.randn(n, device="cuda").bfloat16()
    deq = fp8.dequantize(q, scale, k)
    errs = {}
    for rows in (1, 3, 16, 64, 300):
        x = torch.randn(rows, k, device="cuda").bfloat16()
        zero = rows > 1  # then the last token is all zeros: it gets a finite scale, and the bias alone
        if zero:
            x[-1] = 0
        y = lin(x, bias)
        ref = x.float() @ deq.T + bias.float()
        path = "gemv" if rows <= 64 and gemv.config_for(rows, n, k, fp8=True) is not None else "scaled_mm"
        real = rows - zero
        errs[rows] = (path, rel(y[:real], ref[:real]))
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        if zero:
            torch.testing.assert_close(y[-1].float(), bias.float(), atol=1e-2, rtol=0)
        assert errs[rows][1] <= (GEMV_TOL if path == "gemv" else MM_TOL), f"rows {rows}: {errs[rows]}"
    RESULTS.setdefault("fp8_linear", {})[f"{n}x{k}"] = errs


def test_quantize_tokens_kernel_equals_torch():
    """The Triton per-token quantization against the torch ops it replaces: the same scales, the same e4m3 values
    but where Triton's float32 division (not correctly rounded) lands a quotient across a rounding boundary, and
    there one e4m3 step apart at most."""
    torch.manual_seed(2)
    x = torch.randn(300, 14336, device="cuda").bfloat16() * 3
    x[7] = 0
    q, scale = fp8.quantize_tokens_triton(x)
    want_q, want_scale = (t.cuda() for t in fp8.quantize_tokens(x.cpu()))
    assert torch.equal(scale, want_scale)
    same = (q.float() == want_q.float()).float().mean().item()
    assert same > 0.999, same
    torch.testing.assert_close(q.float(), want_q.float(), rtol=2**-3, atol=2**-9)


@pytest.mark.parametrize("rows", [1, 8])
def test_fp8_gemv_against_scaled_mm_and_in_a_graph(rows):
    """The decode GEMV against _scaled_mm on the same FP8 weight (o_proj / down_proj shapes, where both run), and
    against F.linear on the dequantized bf16 weight; then captured in a CUDA graph and replayed on new input."""
    torch.manual_seed(1)
    n, k = 4096, 14336
    q, scale = fp8.quantize_rows((0.02 * torch.randn(n, k, device="cuda")).bfloat16())
    x = torch.randn(rows, k, device="cuda").bfloat16()
    cfg = gemv.config_for(rows, n, k, fp8=True)
    assert cfg is not None
    y = gemv.gemv(x, q, None, cfg, scale=scale)
    mm = fp8.scaled_mm(x, q, scale.view(1, -1), None)
    dense = F.linear(x, fp8.dequantize(q, scale, k).bfloat16())
    figures = {"gemv_vs_scaled_mm": rel(y, mm.float()), "gemv_vs_bf16_dequantized": rel(y, dense.float())}
    assert figures["gemv_vs_scaled_mm"] <= MM_TOL and figures["gemv_vs_bf16_dequantized"] <= GEMV_TOL
    lin = fp8.Fp8Linear(q, scale, k)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    lin(static_x, None)  # compile outside the capture
    with torch.cuda.graph(graph):
        out = lin(static_x, None)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    assert torch.equal(out, lin(static_x, None))
    RESULTS.setdefault("fp8_gemv", {})[rows] = figures


def forced(runner, seqs: list[list[int]], prompt_len: int) -> torch.Tensor:
    """Each sequence's first `prompt_len` tokens prefilled, then the rest fed one decode step at a time (batched):
    the logits [B, L, V] at every position from the prompt's last on (float32, CPU)."""
    d = Driver(runner)
    reqs = [d.start(s[:prompt_len]) for s in seqs]
    d.run([(r, prompt_len) for r in reqs])
    for pos in range(prompt_len, len(seqs[0])):
        for r, s in zip(reqs, seqs):
            r.tokens[-1] = s[pos]  # the sequence's token, not the one the runner chose
        d.run([(r, 1) for r in reqs], is_decode=True)
    return torch.stack([torch.stack(r.logits) for r in reqs])


def compare(ours: torch.Tensor, ref: torch.Tensor, bounds: dict[str, float]) -> dict[str, float]:
    """Teacher-forced logits against a reference's: the worst row's relative L2 error, the worst gap between the
    reference's best logit and its logit of our top-1 token, the share of positions with the same top-1;
    asserts `bounds` and MIN_TOP1."""
    top = ours.argmax(-1, keepdim=True)
    figures = {"rel_err": ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item(),
               "gap": (ref.max(-1).values - ref.gather(-1, top)[..., 0]).max().item(),
               "top1": (top[..., 0] == ref.argmax(-1)).float().mean().item()}
    assert all(figures[k] <= bound for k, bound in bounds.items()) and figures["top1"] >= MIN_TOP1, figures
    return figures


def sequences(seed: int, n: int = 3, length: int = 64) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1000, (n, length), generator=gen).tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fp8_weights_through_the_runner(kind, tmp_path):
    """--quantization fp8 on a tiny model: FP8 linears (embedding / LM head bf16), greedy tokens with CUDA graphs
    equal eager ones, teacher-forced logits against the bf16 model within FP8_WEIGHTS."""
    save_tiny(kind, str(tmp_path))
    seqs = sequences(2)
    ref = forced(runner_for(str(tmp_path)), seqs, 16)
    eager = runner_for(str(tmp_path), quantization="fp8", disable_cuda_graph=True)
    info = eager.runtime_info()
    assert info.weight_dtype == "float8_e4m3fn" and info.dtype == "bfloat16"
    assert eager.model.model.layers[0].mlp.down_proj.weight.dtype == fp8.FP8
    assert eager.model.lm_head.weight.dtype == torch.bfloat16
    eager_reqs = scenario(eager, prompts(1))
    del eager
    graphs = runner_for(str(tmp_path), quantization="fp8")
    assert [r.tokens for r in scenario(graphs, prompts(1))] == [r.tokens for r in eager_reqs]
    RESULTS[f"fp8_{kind}"] = compare(forced(graphs, seqs, 16), ref, FP8_WEIGHTS)


@pytest.mark.parametrize("layout", ["hf-block", "ct-channel", "ct-tensor"])
def test_fp8_checkpoints_on_the_gpu(layout, tmp_path):
    """Both checkpoint layouts load on CUDA (block scales requantized per channel) and agree with their
    dequantized twin served in bf16 within FP8_WEIGHTS."""
    save_tiny("llama", str(tmp_path / "hf"))
    fp8_dir, ref_dir = write_checkpoints(str(tmp_path / "hf"), layout, tmp_path)
    seqs = sequences(3)
    ref = forced(runner_for(ref_dir), seqs, 16)
    ours = runner_for(fp8_dir)
    assert ours.runtime_info().weight_dtype == "float8_e4m3fn"
    RESULTS.setdefault("fp8_checkpoints", {})[layout] = compare(forced(ours, seqs, 16), ref, FP8_WEIGHTS)


def test_fp8_kv_cache_against_bf16(tmp_path):
    """--kv-cache-dtype fp8_e4m3 through FlashInfer (prefill, decode, graphs, a radix hit): half the bytes per
    token, teacher-forced logits against bf16 KV within FP8_KV, graph tokens equal eager ones; FP8 weights and FP8
    KV together run too."""
    save_tiny("qwen2", str(tmp_path))
    bf16 = runner_for(str(tmp_path))
    seqs = sequences(4)
    ref = forced(bf16, seqs, 16)
    per_token = bf16.kv_bytes_per_token
    del bf16
    kv8 = runner_for(str(tmp_path), kv_cache_dtype="fp8_e4m3")
    assert kv8.kv_bytes_per_token * 2 == per_token and kv8.runtime_info().kv_cache_dtype == "float8_e4m3fn"
    RESULTS["fp8_kv"] = compare(forced(kv8, seqs, 16), ref, FP8_KV)
    graph_reqs = scenario(kv8, prompts(2))
    del kv8
    eager_reqs = scenario(runner_for(str(tmp_path), kv_cache_dtype="fp8_e4m3", disable_cuda_graph=True), prompts(2))
    both = scenario(runner_for(str(tmp_path), kv_cache_dtype="fp8_e4m3", quantization="fp8"), prompts(2))
    assert [r.tokens for r in graph_reqs] == [r.tokens for r in eager_reqs]
    assert all(len(r.tokens) > r.prompt_len for r in both)


def test_a_gpu_without_fp8_fails_naming_the_option(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="--quantization fp8.*no FP8 tensor cores"):
        fp8.check_gpu(torch.device("cuda"), "--quantization fp8")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fp8_tp2_matches_tp1(tmp_path):
    """FP8 weights quantized at load with tp 2 (each rank's shard and its scales; row-parallel scales agreed over
    the ranks) give tp 1's greedy tokens through the Engine, up to near ties: where a request's tokens first part,
    tp 2's token is tp 1's runner-up within TP_TIE in log-probability (a row-parallel layer's activations are
    quantized per token over each rank's slice, so prefill rounds a little differently)."""
    from radixserve import Engine

    save_tiny("llama", str(tmp_path), seed=5)
    batch = prompts(6)
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    outs = {}
    for tp in (1, 2):
        with Engine(str(tmp_path), tp_size=tp, quantization="fp8", skip_tokenizer_init=True, max_total_tokens=4096,
                    max_running_requests=8, cuda_graph_max_bs=8) as eng:
            outs[tp] = eng.generate(input_ids=batch, sampling_params=params, return_logprob=True, top_logprobs_num=2)
            assert eng.server_info()["worker"]["weight_dtype"] == "float8_e4m3fn"
    identical = 0
    for one, two in zip(outs[1], outs[2]):
        a, b = one["output_ids"], two["output_ids"]
        if a == b:
            identical += 1
            continue
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        (lp1, _, _), (lp2, runner_up, _) = one["meta_info"]["output_top_logprobs"][i][:2]
        assert b[i] == runner_up and lp1 - lp2 <= TP_TIE, (i, lp1, lp2)
    RESULTS["fp8_tp2"] = {"identical_requests": identical, "requests": len(batch)}
