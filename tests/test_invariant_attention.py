"""The batch-invariant CUDA attention (worker_proc/attention/invariant_backend.py) through Triton's interpreter on
CPU tensors (float16: the interpreter's tl.dot misreads bfloat16): each row against float32 softmax attention, and
a row's bits the same whether its token is decoded alone, verified in a short extend beside other requests, or
prefilled in one long extend, with its context's splits walked by one program or computed in parallel and merged.
The kernels are also compiled here for an H100 ahead of time (no GPU needed), and run compiled in
tests/test_gpu_spec.py's deterministic Engine test and `bench check-determinism` on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fused_interpreted import run_interpreted

pytest.importorskip("triton")

Q_HEADS, KV_HEADS, DIM, SLOTS = 8, 2, 32, 400


def check_invariant_attention() -> None:
    from worker_proc.attention import invariant_backend
    from worker_proc.attention.base import ForwardMeta, LayerAttention
    from worker_proc.attention.invariant_backend import InvariantBackend
    from worker_proc.kv_cache import KVCache

    invariant_backend.MIN_SPLIT = 16  # contexts of up to ten splits (of 16 positions)

    torch.manual_seed(0)
    cache = KVCache(1, SLOTS, KV_HEADS, DIM, torch.float16, "cpu")
    cache.k[0].copy_(torch.randn(SLOTS, KV_HEADS, DIM).half())
    cache.v[0].copy_(torch.randn(SLOTS, KV_HEADS, DIM).half())
    scale = DIM ** -0.5
    backend = InvariantBackend(cache, Q_HEADS, DIM, [LayerAttention(scale)])
    lengths = {0: 150, 1: 70, 2: 9}  # each request's whole context
    table = torch.zeros(3, 160, dtype=torch.int32)
    perm = torch.randperm(SLOTS - 1) + 1
    used = 0
    for r, n in lengths.items():
        table[r, :n] = perm[used:used + n].int()
        used += n
    queries = {r: torch.randn(n, Q_HEADS, DIM).half() for r, n in lengths.items()}  # one per position

    def step(parts: list[tuple[int, int, int]], parallel: bool = True,
             graph: bool = False) -> dict[tuple[int, int], torch.Tensor]:
        """(request, cached, new tokens) per request: each new token's output rows, keyed (request, position);
        `parallel`: the splits in parallel (else one program walks them); `graph`: prepared as a CUDA graph's step
        (its workspace sized for the table's whole width)."""
        slots, cached, extend = (np.array(col, dtype=np.int32) for col in zip(*parts, strict=True))
        meta, _, _ = ForwardMeta.for_positions(table, slots, cached, extend)
        backend.split_below = 1000 if parallel else 0
        if graph:
            backend.prepare_graph(meta)
        else:
            backend.prepare(meta)
        assert backend.split == 16 and (backend.splits is not None) == parallel
        q = torch.cat([queries[r][c:c + e] for r, c, e in parts])
        out = backend._attend(q, 0)
        keys = [(r, p) for r, c, e in parts for p in range(c, c + e)]
        return dict(zip(keys, out, strict=True))

    whole = step([(0, 0, 150), (1, 0, 70), (2, 0, 9)], parallel=False)  # cold prefills (tiles of 16, ragged ends)
    for (r, p), row in whole.items():
        ctx = table[r, :p + 1].long()
        k, v = cache.k[0][ctx].float(), cache.v[0][ctx].float()  # [p + 1, KV_HEADS, D]
        group = Q_HEADS // KV_HEADS
        q = queries[r][p].float().view(KV_HEADS, group, DIM)
        probs = torch.softmax(torch.einsum("hgd,phd->hgp", q, k) * scale, dim=-1)
        ref = torch.einsum("hgp,phd->hgd", probs, v).reshape(Q_HEADS, DIM)
        torch.testing.assert_close(row.float(), ref, rtol=2e-2, atol=2e-2)
    backend.init_graphs(2, 2 * table.shape[1])
    ways = [step([(0, 149, 1)]),  # a decode step alone
            step([(1, 30, 1), (0, 120, 1)], graph=True),  # decode steps through graphs' workspaces
            step([(0, 149, 1)], graph=True),
            step([(2, 5, 4), (0, 145, 5), (1, 69, 1)]),  # a verify-sized extend beside others
            step([(1, 60, 10), (0, 130, 20)]),  # a chunk of a chunked prefill
            step([(0, 0, 150), (1, 0, 70), (2, 0, 9)])]  # the cold prefills, their splits in parallel
    for got in ways:
        for key, row in got.items():
            assert torch.equal(row, whole[key]), f"{key}: differs from the cold prefill's row"
    print("invariant_attention ok")


def test_a_row_has_the_same_bits_decoded_verified_chunked_or_prefilled():
    run_interpreted("check_invariant_attention", module="test_invariant_attention")


def _signature(fn, types: dict[str, str]) -> dict[str, str]:
    """A kernel's signature for triton.compile: its parameters' types (`types` by name, else int32 scalars; the
    constexprs marked so)."""
    return {name: "constexpr" if name.isupper() else types.get(name, "i32") for name in fn.arg_names}


def test_the_kernels_compile_for_hopper_without_fused_multiply_adds():
    """The three kernels compiled ahead of time for an H100 (sm_90; no GPU needed) with the backend's options: they
    compile, and no float32 multiply-add is fused (the merge in attend and in merge_splits must round alike)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from worker_proc.attention import invariant_kernels as kernels
    from worker_proc.attention.invariant_backend import BLOCK_N, COMPILE_OPTIONS

    pointers = {**dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "o_ptr"), "*bf16"),
                **dict.fromkeys(("tops_ptr", "totals_ptr", "accs_ptr"), "*fp32"), "qk_scale": "fp32",
                **dict.fromkeys(("tile_ptr", "qo_ptr", "seq_ptr", "ext_ptr", "req_ptr", "r2t_ptr"), "*i32")}
    shape = {"GROUP": 4, "GROUP_PAD": 4, "BLOCK_T": 16, "D": 128, "D_PAD": 128, "BLOCK_N": BLOCK_N}
    for fn in (kernels.attend, kernels.attend_splits, kernels.merge_splits):
        signature = _signature(fn, pointers)
        constants = {(fn.arg_names.index(name),): value for name, value in shape.items() if name in signature}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32), options={**COMPILE_OPTIONS, "num_stages": 2})
        ptx = compiled.asm["ptx"]
        assert "ex2.approx" in ptx and "fma.rn.f32" not in ptx, fn.__name__
