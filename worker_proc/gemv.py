"""Matrix-vector products for decode batches (Triton, CUDA only): y = x W^T (+ bias) for a few rows of x.

At batch 1 cuBLAS splits K for the narrow projections (o_proj, down_proj) and runs a reduction kernel after
each, and streams the wide ones (gate_up, the LM head) below the copy rate. Here each program owns BLOCK_N
whole rows of W and sweeps all of K, so one kernel streams the weight once and writes the result: no partial
sums, no second kernel. Two paths: CUDA-core dot products (one row of x) and tensor-core tiles (rows padded
to 16). Accumulates in float32 and rounds once, as cuBLAS does (only the summation order differs).
An FP8 weight (worker_proc.fp8) goes through the same kernel: its e4m3 values are widened in registers and its
per-row scale multiplies the float32 sum, so the step reads one byte per weight.
triton is imported lazily, on the first call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from worker_proc import fused

ENABLED = True
"""layers.linear uses these kernels where `choose` says so while True; False keeps F.linear (for comparisons)."""


class Config(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tensor_cores: bool  # False: CUDA-core dot products, one row of x only


def config_for(rows: int, n: int, k: int, fp8: bool = False) -> Config | None:
    """The launch shape for x [rows, k] @ W[n, k]^T, or None where cuBLAS (with `fp8`, an e4m3 W: _scaled_mm) is as
    fast. Chosen from scripts/bench_linear.py sweeps on Hopper (docs/benchmarks.md). bf16 (H200): at one row every
    projection of the Llama and Qwen shapes; narrow outputs (k >= n: o_proj, down_proj) up to 16 rows, where cuBLAS
    splits K. FP8 (H100): an e4m3 column holds half the bytes, so one row reads 2048 columns per step in blocks of
    4 rows; up to 16 rows the tensor-core GEMV beats _scaled_mm (which first quantizes x) on every projection."""
    if fp8:
        if rows == 1:
            return Config(4, 2048, 4, 2, False)
        return Config(32, 256, 4, 4, True) if rows <= 16 else None
    if k >= n and rows <= 16:
        return Config(32, 256, 4, 4, True)
    if rows == 1:
        return Config(8, 1024, 4, 3, False)
    return None


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, rows, n, k, stride_x, stride_w, stride_y,
             HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M).to(tl.int64)  # row * stride may pass 2**31
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < n
        w_rows = w_ptr + tl.minimum(rn, n - 1).to(tl.int64)[:, None] * stride_w  # rows past n: masked at the store
        x_rows = x_ptr + rm[:, None] * stride_x
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + rk
            if EVEN_K:
                w = tl.load(w_rows + cols[None, :])
                x = tl.load(x_rows + cols[None, :], mask=rm[:, None] < rows, other=0.0)
            else:
                w = tl.load(w_rows + cols[None, :], mask=cols[None, :] < k, other=0.0)
                x = tl.load(x_rows + cols[None, :], mask=(rm[:, None] < rows) & (cols[None, :] < k), other=0.0)
            if BLOCK_M == 1:
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        if HAS_SCALE:  # an FP8 weight's per-row scale
            acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < rows) & n_ok[None, :])

    return gemv


@functools.cache
def _measured_on(device: torch.device) -> bool:
    """config_for's choices were measured on Hopper (H200); other GPUs keep cuBLAS."""
    return torch.cuda.get_device_capability(device)[0] == 9


def choose(x: torch.Tensor, weight: torch.Tensor) -> Config | None:
    """The launch shape with which `gemv` serves F.linear(x, weight) in layers.linear (a 2-D bf16/fp16 x on a
    Hopper GPU whose shape has a `config_for`), or None: F.linear."""
    if not (ENABLED and x.is_cuda and x.dim() == 2 and x.shape[0] > 0 and x.stride(1) == 1
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.stride(1) == 1):
        return None
    cfg = config_for(x.shape[0], weight.shape[0], x.shape[1])
    return cfg if cfg is not None and _measured_on(x.device) else None


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Config,
         scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, k] @ weight [n, k]^T (+ bias [n]) -> [rows, n] in x's dtype with launch shape `cfg` (`choose`'s
    or `config_for`'s); rows <= 64, unit stride along k. An e4m3 `weight` comes with `scale` [n, 1] (float32,
    one per row): x (weight * scale)^T."""
    rows, k = x.shape
    n = weight.shape[0]
    assert rows <= 64 and x.stride(1) == 1 and weight.stride(1) == 1 and weight.shape[1] == k
    assert cfg.tensor_cores or rows == 1
    assert (scale is None) == (weight.dtype == x.dtype) and (scale is None or scale.numel() == n)
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block_m = max(16, fused.pow2(rows)) if cfg.tensor_cores else 1
    _kernel()[(-(-n // cfg.block_n),)](
        x, weight, bias if bias is not None else weight, scale if scale is not None else weight, y, rows, n, k,
        x.stride(0), weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        EVEN_K=k % cfg.block_k == 0, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
