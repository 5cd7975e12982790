"""worker_proc.fused's and worker_proc.gemv's Triton kernels run through Triton's interpreter on CPU tensors (CI has no
GPU; the same comparisons run compiled on the GPU in scripts/gpu_check.py). TRITON_INTERPRET must be set before
triton is imported, so the checks run in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


def check_rotary_store() -> None:
    """rotary_store == rotary + store_kv (the two kernels it replaces), bit for bit, on strided views of one
    qkv projection, GQA heads, a non-power-of-two head count, scattered slots; untouched slots stay zero."""
    from worker_proc import fused
    from worker_proc.kv_cache import KVCache

    torch.manual_seed(0)
    tokens, q_heads, kv_heads, dim = 5, 6, 3, 16
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, dim).bfloat16()
    qk, v = qkv[:, : q_heads + kv_heads], qkv[:, q_heads + kv_heads:]
    table = torch.randn(40, dim // 2)
    positions = torch.tensor([3, 0, 17, 39, 8])
    cos, sin = table.cos()[positions].bfloat16()[:, None], table.sin()[positions].bfloat16()[:, None]
    slots = torch.tensor([7, 2, 9, 4, 11], dtype=torch.int32)

    want = KVCache(1, 12, kv_heads, dim, torch.bfloat16, "cpu")
    rotated = fused.rotary(qk, cos, sin)
    fused.store_kv(want.k[0], want.v[0], slots, rotated[:, q_heads:], v)
    got = KVCache(1, 12, kv_heads, dim, torch.bfloat16, "cpu")
    q = fused.rotary_store(qk, v, cos, sin, slots, got.k[0], got.v[0], q_heads)
    assert torch.equal(q, rotated[:, :q_heads])
    assert torch.equal(got.k[0], want.k[0]) and torch.equal(got.v[0], want.v[0])
    assert torch.equal(got.v[0][slots.long()], v) and not got.k[0][[0, 1, 3]].any()
    # and against the rotation in float32: the pairs (x[i], x[i + D/2]) turn by the position's angle
    x1, x2 = qk.float().chunk(2, dim=-1)
    ref = torch.cat((x1 * cos.float() - x2 * sin.float(), x2 * cos.float() + x1 * sin.float()), dim=-1)
    torch.testing.assert_close(q.float(), ref[:, :q_heads], rtol=2**-7, atol=1e-2)
    print("rotary_store ok")


def check_gemv() -> None:
    """gemv == x W^T (+ bias) in float32, rounded once: one row on CUDA cores, 1 and 3 rows on tensor cores
    (padded to 16), a ragged n, k both a multiple of BLOCK_K and not, a strided x, with and without bias.
    The tensor-core path runs in float16 here: the interpreter's tl.dot misreads bfloat16 (the GPU check runs
    it in bfloat16)."""
    from worker_proc import gemv

    torch.manual_seed(0)
    cuda_cores, tensor_cores = gemv.Config(16, 32, 4, 1, False), gemv.Config(32, 64, 4, 2, True)
    for rows, n, k, bias, cfg in ((1, 50, 64, False, cuda_cores), (1, 37, 72, True, cuda_cores),
                                  (1, 37, 72, True, tensor_cores), (3, 40, 96, True, tensor_cores),
                                  (3, 33, 64, False, tensor_cores)):
        dtype = torch.float16 if cfg.tensor_cores else torch.bfloat16
        x = torch.randn(rows, k + 8, dtype=dtype)[:, :k]  # a row stride of k + 8
        w, b = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype) if bias else None
        y = gemv.gemv(x, w, b, cfg)
        ref = x.float() @ w.float().T + (b.float() if bias else 0)
        assert y.shape == (rows, n) and y.dtype == dtype
        torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=2**-7, atol=1e-3)
    print("gemv ok")


def check_batch_invariant_matmul() -> None:
    """batch_invariant.matmul == a @ b in float32, rounded once, and a row's bits do not depend on the other rows
    (m of 1, 5 and 300: one tile, part of one, three; a ragged n over two tiles; 4 persistent programs). float16:
    the interpreter misreads this kernel's bf16 loads (the values come out near 1e10), which compiled it does not."""
    from worker_proc import batch_invariant

    torch.manual_seed(0)
    a, w = torch.randn(300, 96).half(), torch.randn(200, 96).half()
    full = batch_invariant.matmul(a, w.t())
    torch.testing.assert_close(full.float(), (a.float() @ w.float().t()).half().float(), rtol=2**-9, atol=1e-2)
    for rows in (slice(0, 1), slice(7, 12), slice(250, 251), slice(131, 300)):
        assert torch.equal(batch_invariant.matmul(a[rows], w.t()), full[rows]), rows
    assert batch_invariant.matmul(a[:0], w.t()).shape == (0, 200)
    print("batch_invariant_matmul ok")


def check_small_tiles_choice() -> None:
    """choose_small_tiles keeps a decode launch shape only if every row has the default shape's bits: one that
    walks K in other steps is refused even when timed fastest; one that only narrows the output tile is kept (the
    interpreter sums each tile's products alike); rows then have the default's bits at every batch size."""
    from worker_proc import batch_invariant as bi

    torch.manual_seed(0)
    bi.CHECK_ROWS, bi.SMALL_M = (1, 3, 16, 17, 40), 16
    other_k, narrow = bi.Tiles(16, 32, 2, 4), bi.Tiles(16, 64, 2, 4, 16)
    bi.SMALL_CANDIDATES = (other_k, narrow)
    weights = [torch.randn(n, 96).half() for n in (40, 40, 72)]
    # timed: other_k fastest, then narrow, then the default (shape 40's candidates all time as the default)
    timed = {other_k: 0.0, narrow: 1.0}
    chosen = bi.choose_small_tiles(weights, lambda calls: timed.get(bi.PLANS.get((72, 96)), 2.0))
    assert chosen == {(40, 96): bi.TILES, (72, 96): narrow}, chosen
    x = torch.randn(40, 96).half()
    for w in weights:
        for m in (1, 7, 16, 17):
            assert torch.equal(bi.matmul(x[:m], w.t()), bi.matmul(x[:m], w.t(), bi.TILES)), (w.shape, m)
    assert not torch.equal(bi.matmul(x, weights[2].t(), other_k), bi.matmul(x, weights[2].t(), bi.TILES))
    print("small_tiles_choice ok")


def run_interpreted(check: str, module: str = "test_fused_interpreted") -> None:
    """Run tests/`module`.py's `check` in a child with TRITON_INTERPRET=1; it must print "<name> ok"."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parent
    code = f"import sys; sys.path[:0] = [{str(root)!r}, {str(root.parent)!r}]; " \
           f"from {module} import {check}; {check}()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"{check.removeprefix('check_')} ok" in proc.stdout, proc.stdout + proc.stderr


def test_rotary_store_equals_rotary_then_store():
    run_interpreted("check_rotary_store")


def test_gemv_equals_float32_product():
    run_interpreted("check_gemv")


FAR_STRIDE = 2**30 + 2**10  # row 2 of a view with this row stride starts past 2**31 elements


def check_int64_offsets() -> None:
    """Every kernel reads and writes rows whose offset (row * stride) passes 2**31, as one prefill of 65,536 tokens
    x 37,888 columns does: on views with a row stride of 2**30 + 2**10 into one 4 GiB storage (never touched beyond
    these rows, so only virtual), each gives bit for bit what it gives on a compact copy. In int32 the offsets wrap
    and the reads fault."""
    from worker_proc import fused, gemv

    torch.manual_seed(0)
    storage = torch.empty(2 * FAR_STRIDE + 2**16, dtype=torch.int16)
    used = 0

    def far(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A [rows, cols] view of random values, FAR_STRIDE apart, beside the views made before it."""
        nonlocal used
        view = storage.view(dtype).as_strided((rows, cols), (FAR_STRIDE, 1), used)
        view.copy_(torch.randn(rows, cols).to(dtype))
        used += cols
        return view

    def same(a, b) -> None:
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    tokens, q_heads, kv_heads, dim, n = 3, 4, 2, 16, 64
    bf16 = torch.bfloat16
    x, res, w = far(tokens, n, bf16), far(tokens, n, bf16), torch.randn(n).to(bf16)
    same(fused.add_rmsnorm(x, w, 1e-6, res), fused.add_rmsnorm(x.contiguous(), w, 1e-6, res.contiguous()))
    gate_up = far(tokens, 2 * n, bf16)
    assert torch.equal(fused.silu_and_mul(gate_up), fused.silu_and_mul(gate_up.contiguous()))

    qkv = far(tokens, (q_heads + 2 * kv_heads) * dim, bf16).view(tokens, q_heads + 2 * kv_heads, dim)
    qk, v = qkv[:, :q_heads + kv_heads], qkv[:, q_heads + kv_heads:]
    angles = torch.randn(tokens, 1, dim // 2)
    cos, sin = angles.cos().to(bf16), angles.sin().to(bf16)
    assert torch.equal(fused.rotary(qk, cos, sin), fused.rotary(qk.contiguous(), cos, sin))
    slots = torch.tensor([5, 1, 3], dtype=torch.int32)
    caches = [torch.zeros(8, kv_heads, dim, dtype=bf16) for _ in range(4)]
    fused.store_kv(caches[0], caches[1], slots, qk[:, q_heads:], v)
    fused.store_kv(caches[2], caches[3], slots, qk[:, q_heads:].contiguous(), v.contiguous())
    same(caches[:2], caches[2:])
    assert torch.equal(caches[1][slots.long()], v)
    for cache in caches:
        cache.zero_()
    q = fused.rotary_store(qk, v, cos, sin, slots, caches[0], caches[1], q_heads)
    q_compact = fused.rotary_store(qk.contiguous(), v.contiguous(), cos, sin, slots, caches[2], caches[3], q_heads)
    same([q, *caches[:2]], [q_compact, *caches[2:]])
    assert caches[0].any()

    # the tensor-core path in float16 (see check_gemv); one row never leaves row 0
    x, weight = far(tokens, n, torch.float16), torch.randn(40, n, dtype=torch.float16)
    cfg = gemv.Config(32, 32, 4, 1, True)
    assert torch.equal(gemv.gemv(x, weight, None, cfg), gemv.gemv(x.contiguous(), weight, None, cfg))
    print("int64_offsets ok")


def test_offsets_past_2_31_elements():
    run_interpreted("check_int64_offsets")


def test_batch_invariant_matmul_rows_do_not_depend_on_the_batch():
    run_interpreted("check_batch_invariant_matmul")


def test_decode_launch_shapes_are_kept_only_where_rows_sum_alike():
    run_interpreted("check_small_tiles_choice")
