"""--enable-deterministic-inference on the CPU: each batch-invariant op gives a row the same bits whatever the other
rows are; the model's logits for a prompt are the same alone, batched, chunked or from cached KV; the plain ops
this mode replaces are not (so the checks can fail); and without the flag nothing of the mode runs."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_harness import RaggedRunner

from worker_proc import batch_invariant, cpu_kernels
from worker_proc.layers import pack_cpu_linears
from worker_proc.weights import load_model

needs_cpu_kernels = pytest.mark.skipif(cpu_kernels.library() is None,
                                       reason="cpu_kernels needs AVX512-BF16 and a C compiler")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and triton, flashinfer)")


@pytest.fixture
def invariant(monkeypatch):
    monkeypatch.setattr(batch_invariant, "ENABLED", True)


def test_float32_linear_depends_on_the_batch_without_the_mode():
    """Why the mode exists on the CPU: MKL's float32 GEMM sums row 0 differently at 1 row and at many. The check
    that picks CUDA's linear at start (rows_invariant) sees it, and passes the mode's own linear."""
    torch.manual_seed(0)
    w, x = torch.randn(1536, 576), torch.randn(40, 576)
    assert not all(torch.equal(F.linear(x[:m], w)[:1], F.linear(x[:1], w)) for m in (2, 4, 8, 17, 40))
    assert not batch_invariant.rows_invariant(F.linear, w)
    assert batch_invariant.rows_invariant(lambda rows, weight: batch_invariant.linear(rows, weight, None, None), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_do_not_depend_on_the_batch(dtype):
    torch.manual_seed(0)
    w, b, x = torch.randn(1536, 576).to(dtype), torch.randn(1536).to(dtype), torch.randn(40, 576).to(dtype)
    alone = torch.cat([batch_invariant.linear(x[i:i + 1], w, b, None) for i in range(40)])
    for m in (2, 3, 16, 17, 40):
        assert torch.equal(batch_invariant.linear(x[:m], w, b, None), alone[:m]), m
    assert torch.equal(batch_invariant.linear(x[5:40], w, b, None), alone[5:])  # other neighbours in the block


@needs_cpu_kernels
def test_packed_linear_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    w, x = torch.randn(1000, 576).bfloat16(), torch.randn(40, 576).bfloat16()
    packed = cpu_kernels.PackedLinear(w)
    alone = torch.cat([batch_invariant.linear(x[i:i + 1], w, None, packed) for i in range(40)])
    for lo, hi in ((0, 9), (3, 40), (0, 40)):
        assert torch.equal(batch_invariant.linear(x[lo:hi], w, None, packed), alone[lo:hi])


@needs_cpu_kernels
@pytest.mark.parametrize("form", ["int8", "Q4_1"])
def test_quantized_linear_rows_do_not_depend_on_the_batch(form):
    """--quantization int8 / gguf in the mode: every call runs blocks of 16 rows, so a row alone takes the path of
    many (activations quantized per row, where the CPU has AVX512-VNNI) and keeps its bits in any batch; why an
    explicit --quantization int8 / gguf is allowed with the flag (the default for a GGUF file expands in it)."""
    from test_cpu_quant import quant_weight

    from worker_proc.cpu_quant import QuantLinear

    torch.manual_seed(0)
    packed = QuantLinear(quant_weight(torch.randn(1000, 576) * 0.05, form))
    x, empty = torch.randn(40, 576).bfloat16(), torch.empty(0, dtype=torch.bfloat16)
    alone = torch.cat([batch_invariant.linear(x[i:i + 1], empty, None, packed) for i in range(40)])
    for lo, hi in ((0, 9), (3, 40), (0, 40)):
        assert torch.equal(batch_invariant.linear(x[lo:hi], empty, None, packed), alone[lo:hi])
    assert not torch.equal(packed(x[:1], None), alone[:1]) or not cpu_kernels.q8_rows()  # one row, as the mode is off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_rows_do_not_depend_on_the_batch_and_match_sdpa(dtype):
    """Rows of different requests and lengths (across several splits), alone or together, in any order."""
    torch.manual_seed(0)
    hq, hkv, dim, slots = 6, 2, 32, 600
    k_cache, v_cache = torch.randn(slots, hkv, dim).to(dtype), torch.randn(slots, hkv, dim).to(dtype)
    req_to_token = torch.randperm(slots - 1).add(1).int()[:3 * 190].view(3, 190).contiguous()
    lens = torch.tensor([1, 63, 64, 65, 130, 190, 7, 129], dtype=torch.int32)
    reqs = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0], dtype=torch.int32)
    q = torch.randn(len(lens), hq, dim).to(dtype)
    together = batch_invariant.attention(q, k_cache, v_cache, req_to_token, reqs, lens, dim**-0.5)
    for i in range(len(lens)):
        alone = batch_invariant.attention(q[i:i + 1], k_cache, v_cache, req_to_token, reqs[i:i + 1], lens[i:i + 1],
                                          dim**-0.5)
        assert torch.equal(alone, together[i:i + 1]), i
        ctx = req_to_token[reqs[i], :lens[i]].long()
        ref = F.scaled_dot_product_attention(q[i:i + 1].float().transpose(0, 1), k_cache[ctx].float().transpose(0, 1),
                                             v_cache[ctx].float().transpose(0, 1), enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(alone.float(), ref, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    order = torch.randperm(len(lens))
    shuffled = batch_invariant.attention(q[order], k_cache, v_cache, req_to_token, reqs[order], lens[order], dim**-0.5)
    assert torch.equal(shuffled, together[order])


def test_unseeded_requests_draw_alone_as_batched_in_the_mode():
    """With a default seed (the mode: --random-seed), an unseeded request's noise comes from its own generator, keyed
    by (seed, output index): its tokens are the same sampled alone or beside others."""
    import numpy as np

    from radixserve.wire import NewReq
    from worker_proc.sampling import Sampler, SampleRows, SlotParams

    params = SlotParams(4, torch.device("cpu"), default_seed=5)
    for slot in range(3):
        params.set(NewReq(slot, b"", temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, seed=-1))
    sampler = Sampler(params, torch.device("cpu"), 0)
    torch.manual_seed(0)
    logits = torch.randn(3, 500)

    def draw(rows: list[int], offset: int) -> list[int]:
        slots = np.array(rows, dtype=np.int32)
        picked = SampleRows(slots, torch.from_numpy(slots), np.full(len(rows), offset))
        return sampler.sample(logits[rows], picked)[0].tolist()

    for offset in range(5):
        batched = draw([0, 1, 2], offset)
        assert batched == [draw([i], offset)[0] for i in range(3)] == draw([0, 1, 2], offset)
    assert len({tuple(draw([0, 1, 2], offset)) for offset in range(5)}) > 1  # the noise moves with the index


def _model(dtype: torch.dtype) -> torch.nn.Module:
    from radixserve.model_files import load_hf_config, resolve_model

    model_dir = resolve_model(None, None)
    model = load_model(model_dir, load_hf_config(model_dir), "auto", dtype, "cpu")
    if dtype == torch.bfloat16:
        pack_cpu_linears(model)
    return model


def _served_ways(model: torch.nn.Module, prompts: list[list[int]]) -> dict[str, list[torch.Tensor]]:
    """The last-token logits of every prompt after prefill and after one decode step (token 7), served: alone,
    all in one batch, in chunks of 32 tokens, and after its first half was computed by an earlier step."""
    out: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        alone = []
        for p in prompts:
            r = RaggedRunner(model, max_reqs=1, context_len=256)
            alone.append(torch.cat([r.step([0], [p]), r.step([0], [[7]])]))
        out["alone"] = alone
        r = RaggedRunner(model, max_reqs=len(prompts), context_len=256)
        reqs = list(range(len(prompts)))
        first, second = r.step(reqs, prompts), r.step(reqs, [[7]] * len(prompts))
        out["batched"] = [torch.stack([first[i], second[i]]) for i in reqs]
        chunked = []
        for p in prompts:
            r = RaggedRunner(model, max_reqs=1, context_len=256)
            for i in range(0, len(p), 32):
                last = r.step([0], [p[i:i + 32]])
            chunked.append(torch.cat([last, r.step([0], [[7]])]))
        out["chunks of 32"] = chunked
        # Prompt 1's first half cached, extended beside prompt 0's cold prefill and then decoded with it.
        r = RaggedRunner(model, max_reqs=2, context_len=256)
        half = len(prompts[1]) // 2
        r.step([1], [prompts[1][:half]])
        mixed = r.step([0, 1], [prompts[0], prompts[1][half:]])
        decode = r.step([0, 1], [[7], [7]])
        out["cached prefix"] = [torch.stack([mixed[i], decode[i]]) for i in (0, 1)]
    return out


# float32's torch-op form of the mode is a correctness mode, ~20x slower than without: its logits check is long
# (make test keeps its end-to-end token check, test_check_determinism_finds_no_mismatch_with_the_flag[float32]).
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.long), torch.bfloat16])
def test_model_logits_are_the_same_however_served(dtype, invariant):
    random.seed(0)
    model = _model(dtype)
    prompts = [[random.randrange(1, 40000) for _ in range(n)] for n in (70, 9, 40)]
    ways = _served_ways(model, prompts)
    for way, logits in ways.items():
        for i, got in enumerate(logits):
            assert torch.equal(got, ways["alone"][i]), (way, i)


def test_without_the_flag_no_code_of_the_mode_runs_and_rows_depend_on_the_batch(monkeypatch):
    calls = []
    for name in ("linear", "attention", "matmul"):
        monkeypatch.setattr(batch_invariant, name, lambda *a, name=name, **k: calls.append(name))
    model = _model(torch.float32)
    random.seed(0)
    ways = _served_ways(model, [[random.randrange(1, 40000) for _ in range(n)] for n in (40, 20)])
    assert not batch_invariant.ENABLED and calls == []
    # and what the mode is for: served another way, some logits differ in their bits
    assert any(not torch.equal(got, ways["alone"][i]) for logits in ways.values() for i, got in enumerate(logits))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_check_determinism_finds_no_mismatch_with_the_flag(dtype):
    """`radixserve bench check-determinism`'s check on the default model: 4 prompts (2 in float32) alone (cold),
    in batches of 1 / 2 / 4 (2), batched as radix hits, and batched with 32-token prefill chunks, greedy and
    seeded: every output the same (the bench's defaults run more prompts and batch sizes)."""
    from radixserve.bench.determinism import check
    from radixserve.config import ServerArgs

    # float32's mode is the slow one (fixed 16-row blocks): two prompts, batched together
    prompts, batch_sizes = (4, [1, 2, 4]) if dtype == "bfloat16" else (2, [2])
    args = ServerArgs(dtype=dtype, max_total_tokens=4096, max_running_requests=4, enable_deterministic_inference=True)
    result = check(args, num_prompts=prompts, batch_sizes=batch_sizes, max_new_tokens=3, chunk_size=32)
    assert result["runs"] == 2 * prompts * (len(batch_sizes) + 2) and result["mismatches"] == 0, result


@pytest.mark.long  # two more engine starts and runs of the check, about 25 s
@needs_cpu_kernels
@pytest.mark.parametrize("quantization", ["gguf", "int8"])
def test_check_determinism_finds_no_mismatch_with_quantized_weights(quantization):
    """An explicit --quantization gguf / int8 with the flag: as batch-invariant as bf16 (16-row blocks)."""
    from radixserve.bench.determinism import check
    from radixserve.config import ServerArgs

    args = ServerArgs(quantization=quantization, max_total_tokens=4096, max_running_requests=4,
                      enable_deterministic_inference=True)
    result = check(args, num_prompts=4, batch_sizes=[1, 2, 4], max_new_tokens=3, chunk_size=32)
    assert result["runs"] == 2 * 4 * 5 and result["mismatches"] == 0, result


def test_the_mode_needs_tp_1():
    from radixserve.config import FlagError, ServerArgs

    with pytest.raises(FlagError, match="--enable-deterministic-inference needs --tp-size 1"):
        ServerArgs(tp_size=2, enable_deterministic_inference=True)


@needs_gpu
def test_gpu_matmul_rows_do_not_depend_on_the_batch():
    """Compiled on the GPU, bf16, Llama-3.1-8B's o_proj and gate_up shapes (a narrow and a wide output tile):
    every row's bits at m = 1 .. 300 as at 300."""
    torch.manual_seed(0)
    a = torch.randn(300, 4096, device="cuda").bfloat16()
    for n in (4096, 28672):
        w = torch.randn(n, 4096, device="cuda").bfloat16()
        full = batch_invariant.matmul(a, w.t())
        torch.testing.assert_close(full.float(), (a.float() @ w.float().t()), rtol=2e-2, atol=0.5)
        for m in (1, 2, 7, 64, 129, 256):
            assert torch.equal(batch_invariant.matmul(a[:m], w.t()), full[:m]), (n, m)


@needs_gpu
def test_gpu_linear_of_the_mode_gives_rows_the_same_bits_at_every_batch_size():
    """In a process of its own (cuBLAS reads its workspace settings once, when it first runs): the linear the mode
    chooses at start (cuBLAS without split-K, or the persistent matmul), at Llama-3.1-8B's projection shapes, gives
    every row at m = 1 .. 300 the bits it has at 300."""
    code = """
import torch
from worker_proc import batch_invariant as bi
bi.enable(torch.device("cuda"))
shapes = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
ws = [torch.randn(n, k, device="cuda").bfloat16() for n, k in shapes]
print(bi.choose_cuda_linear(ws))
for w in ws:
    x = torch.randn(300, w.shape[1], device="cuda").bfloat16()
    full = bi.linear(x, w, None, None)
    for m in (1, 2, 3, 7, 9, 64, 129, 200, 256):
        assert torch.equal(bi.linear(x[:m], w, None, None), full[:m]), (tuple(w.shape), m)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parent.parent)
    print(out.stdout)
    assert out.returncode == 0, out.stderr[-3000:]


@needs_gpu
def test_gpu_check_determinism_finds_no_mismatch_with_the_flag():
    from radixserve.bench.determinism import check
    from radixserve.config import ServerArgs

    config = Path(__file__).resolve().parent.parent / "radixserve/model_configs/llama-3.1-8b"
    args = ServerArgs(model_path=str(config), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                      max_total_tokens=16384, max_running_requests=16, enable_deterministic_inference=True)
    result = check(args, num_prompts=16, batch_sizes=[1, 8, 16], max_new_tokens=16, chunk_size=32)
    assert result["mismatches"] == 0, result
