"""Triton kernels (CUDA only) that fuse the small element-wise steps of a decoder layer.

At batch-1 decode each layer is a handful of matrix-vector products and many tiny element-wise kernels;
inside a CUDA graph every kernel still costs a couple of microseconds, so fewer kernels is faster.
Each kernel rounds where the unfused torch code (and HF) rounds, so results match it to float32 noise:
  add_rmsnorm:  residual = bf16(x + residual); out = bf16(bf16(normalise_f32(residual)) * weight)
  silu_and_mul: bf16(bf16(silu(gate)) * up)
  rotary:       rotate-half RoPE of q and k heads together, computed in float32, rounded once
  store_kv:     new K and V (strided views of the projection) into their KV-cache slots, in one kernel
  rotary_store: rotary of q and k, rotated q out, rotated k and v into their KV-cache slots: one kernel for both
Offsets are int64 (program ids are int32): one prefill step of 65,536 tokens x 37,888 columns passes 2**31.
triton is imported lazily, on the first call.
"""

from __future__ import annotations

import functools

import torch

ENABLED = True
"""Callers (layers.py, kv_cache.py) use these kernels for CUDA tensors while True; False runs their plain
torch code (for comparisons)."""


@functools.cache
def _kernels():  # noqa: C901 (kernel definitions)
    import triton
    import triton.language as tl

    @triton.jit
    def add_rmsnorm(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, stride_x, stride_r, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
        h = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        normed = (h * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def silu_and_mul(x_ptr, out_ptr, n, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0)
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
        tl.store(out_ptr + row * n + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def rotary(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xt, stride_xh, stride_ct, half,
               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < heads) & (d < half)
        src = x_ptr + t * stride_xt + h * stride_xh + d
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + t * stride_ct + d, mask=d < half, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_ct + d, mask=d < half, other=0.0).to(tl.float32)
        dst = out_ptr + (t * heads + h) * (2 * half) + d
        tl.store(dst, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def store_kv(k_ptr, v_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                 heads, dim, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < heads) & (d < dim)
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        dst = slot * heads * dim + h * dim + d
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def rotary_store(qk_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_cache_ptr, v_cache_ptr, q_heads, kv_heads,
                     stride_xt, stride_xh, stride_vt, stride_vh, stride_ct, half,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KV: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < q_heads + kv_heads) & (d < half)
        src = qk_ptr + t * stride_xt + h * stride_xh + d
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + t * stride_ct + d, mask=d < half, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_ct + d, mask=d < half, other=0.0).to(tl.float32)
        r1 = (x1 * c - x2 * s).to(q_ptr.dtype.element_ty)  # rounded as rotary rounds, then as the cache stores
        r2 = (x2 * c + x1 * s).to(q_ptr.dtype.element_ty)
        is_q = mask & (h < q_heads)
        q_dst = q_ptr + (t * q_heads + h) * (2 * half) + d
        tl.store(q_dst, r1, mask=is_q)
        tl.store(q_dst + half, r2, mask=is_q)
        is_k = mask & (h >= q_heads)
        k_dst = k_cache_ptr + (slot * kv_heads + h - q_heads) * (2 * half) + d
        tl.store(k_dst, r1.to(k_cache_ptr.dtype.element_ty), mask=is_k)
        tl.store(k_dst + half, r2.to(k_cache_ptr.dtype.element_ty), mask=is_k)
        hv = tl.arange(0, BLOCK_KV)[:, None]
        dv = tl.arange(0, 2 * BLOCK_D)[None, :]
        v_mask = (hv < kv_heads) & (dv < 2 * half)
        v = tl.load(v_ptr + t * stride_vt + hv * stride_vh + dv, mask=v_mask)
        tl.store(v_cache_ptr + (slot * kv_heads + hv) * (2 * half) + dv, v.to(v_cache_ptr.dtype.element_ty),
                 mask=v_mask)

    return add_rmsnorm, silu_and_mul, rotary, store_kv, rotary_store


def pow2(n: int) -> int:
    """The least power of two >= n (a Triton block size)."""
    return 1 << max(0, (n - 1).bit_length())


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rmsnorm(x [+ residual]) * weight, x [+ residual]) for x [T, n] with unit stride along n."""
    kernel = _kernels()[0]
    rows, n = x.shape
    assert x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else None
    block = pow2(n)
    if rows:
        kernel[(rows,)](x, residual if residual is not None else x, weight, out,
                        res_out if res_out is not None else out,
                        n, x.stride(0), residual.stride(0) if residual is not None else 0, eps,
                        HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)))
    return out, res_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2n] (gate | up) -> silu(gate) * up [T, n]."""
    kernel = _kernels()[1]
    rows, n = x.shape[0], x.shape[1] // 2
    assert x.dim() == 2 and x.stride(1) == 1
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = 1024
    if rows:
        kernel[(rows, -(-n // block))](x, out, n, x.stride(0), BLOCK=block, num_warps=4)
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] (unit stride along D) rotate-half RoPE with cos/sin [T, 1, D/2] -> new contiguous [T, H, D]."""
    kernel = _kernels()[2]
    tokens, heads, dim = x.shape
    assert x.stride(2) == 1 and cos.stride(2) == 1 and sin.stride(0) == cos.stride(0)
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        kernel[(tokens,)](x, cos, sin, out, heads, x.stride(0), x.stride(1), cos.stride(0), dim // 2,
                          BLOCK_H=pow2(heads), BLOCK_D=pow2(dim // 2), num_warps=4)
    return out


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k_cache[slots] = k and v_cache[slots] = v for k/v [T, H, D] (unit stride along D), caches [N, H, D]."""
    kernel = _kernels()[3]
    tokens, heads, dim = k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if tokens:
        kernel[(tokens,)](k, v, slots, k_cache, v_cache, k.stride(0), k.stride(1), v.stride(0), v.stride(1), heads, dim,
                          BLOCK_H=pow2(heads), BLOCK_D=pow2(dim), num_warps=4)


def rotary_store(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, q_heads: int) -> torch.Tensor:
    """rotary(qk) as `rotary` does for qk [T, q_heads + kv heads, D]; returns the rotated q [T, q_heads, D] and
    writes the rotated k and v [T, kv heads, D] at k_cache[slots] / v_cache[slots] as `store_kv` does."""
    kernel = _kernels()[4]
    tokens, heads, dim = qk.shape
    kv_heads = heads - q_heads
    assert qk.stride(2) == 1 and v.stride(2) == 1 and cos.stride(2) == 1 and sin.stride(0) == cos.stride(0)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and v.shape == (tokens, kv_heads, dim)
    q = torch.empty((tokens, q_heads, dim), dtype=qk.dtype, device=qk.device)
    if tokens:
        kernel[(tokens,)](qk, v, cos, sin, slots, q, k_cache, v_cache, q_heads, kv_heads, qk.stride(0), qk.stride(1),
                          v.stride(0), v.stride(1), cos.stride(0), dim // 2, BLOCK_H=pow2(heads),
                          BLOCK_D=pow2(dim // 2), BLOCK_KV=pow2(kv_heads), num_warps=4)
    return q
