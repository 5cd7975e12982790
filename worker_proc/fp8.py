"""FP8 (e4m3) linear layers: weights stored in float8_e4m3fn with float32 scales, plugged into layers.linear
through the per-linear `packed` hook (pack_cpu_linears' hook; every column- and row-parallel linear).

A weight W [n, k] is kept as `weight` (e4m3) and `scale` [n, groups] (float32): W[i, j] = weight[i, j] *
scale[i, j // group]. On CUDA the scale is one per output channel (groups = 1; a block-scaled checkpoint is
brought to that form at load: fp8_weights). The product x W^T on CUDA:
  a decode batch of a few rows (gemv.config_for's shapes): the Triton GEMV reads the e4m3 weight, widens it in
    registers and applies the row's scale to the float32 sum (x stays in bf16: weight-only, no activation
    rounding);
  otherwise: x quantized per token (row) to e4m3 with scale amax(|x_row|) / 448 (one Triton kernel), then
    torch._scaled_mm (cuBLASLt, rowwise scales: x's per row, W's per column of W^T), bf16 out.
Neither syncs the host, so both run inside captured CUDA graphs. On the CPU (a pre-quantized checkpoint there:
fp8_weights logs it) the weight is dequantized per call and multiplied in x's dtype: exactly the dequantized
model, which the loader tests compare against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from worker_proc import fused, gemv

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_MIN_SCALE = 1e-12  # an all-zero row or token still gets a finite scale


def quantize_rows(w: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [n, k], float32 scale [n, 1]) with w ≈ q * scale, one scale per row: amax(|row|) / 448, or
    `amax` [n] where the caller agreed it elsewhere (the ranks of a row-parallel weight)."""
    if amax is None:
        amax = w.abs().amax(dim=1).float()
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)[:, None]
    return to_fp8(w.float() / scale), scale


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round to e4m3, saturating at ±448 (a plain cast may give NaN past it)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """weight * scale as float32 [n, k]; `scale` [n, ceil(k / group)]."""
    k = weight.shape[1]
    return weight.float() * scale.repeat_interleave(group, dim=1)[:, :k]


class Fp8Linear:
    """The `packed` callable of an FP8 linear: (x, bias) -> x W^T + bias in x's dtype (see the module docstring).
    Holds the module's own parameters (no copy)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, group: int) -> None:
        assert weight.dtype == FP8 and scale.dtype == torch.float32 and scale.shape[0] == weight.shape[0]
        assert not weight.is_cuda or scale.shape[1] == 1, "CUDA computes with per-channel scales"
        self.weight, self.scale, self.group = weight, scale, group
        self.scale_row = scale.view(1, -1) if scale.shape[1] == 1 else None  # [1, n]: _scaled_mm's scale_b

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not x.is_cuda:
            return F.linear(x, dequantize(self.weight, self.scale, self.group).to(x.dtype), bias)
        n, k = self.weight.shape
        if x.dim() == 2 and x.stride(1) == 1 and 0 < x.shape[0] <= 64:
            cfg = gemv.config_for(x.shape[0], n, k, fp8=True)
            if cfg is not None:
                return gemv.gemv(x, self.weight, bias, cfg, scale=self.scale)
        return scaled_mm(x, self.weight, self.scale_row, bias)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] -> (e4m3 [m, k], float32 scale [m, 1]), one scale per row (token): amax(|row|) / 448. On CUDA one
    Triton kernel (a program per row: its amax, then the row divided and rounded), with the torch ops' scales."""
    if x.is_cuda:
        return quantize_tokens_triton(x)
    # A product with 1 / 448, not a quotient: the kernel's float32 division is not correctly rounded, its product is.
    scale = (x.abs().amax(dim=1, keepdim=True).float() * (1 / FP8_MAX)).clamp(min=_MIN_SCALE)
    return to_fp8(x.float() / scale), scale


def quantize_tokens_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_tokens' Triton kernel (x with unit stride along k)."""
    m, k = x.shape
    assert x.stride(1) == 1
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _quantize_kernel()[(m,)](x, q, scale, k, x.stride(0), FP8_MAX, 1 / FP8_MAX, _MIN_SCALE,
                                 BLOCK=min(4096, fused.pow2(k)), num_warps=4)
    return q, scale


@functools.cache
def _quantize_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows(x_ptr, q_ptr, s_ptr, k, stride_x, fp8_max, inv_fp8_max, min_scale, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        x_row = x_ptr + row * stride_x
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, k, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < k, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) * inv_fp8_max, min_scale)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, k, BLOCK):
            mask = k0 + cols < k
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x / scale, -fp8_max), fp8_max)
            tl.store(q_ptr + row * k + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=mask)

    return quantize_rows


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale_row: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """x [.., k] @ (weight [n, k] * scale_row [1, n]^T)^T with x quantized per token: one cuBLASLt FP8 GEMM."""
    lead, k = x.shape[:-1], x.shape[-1]
    xq, x_scale = quantize_tokens(x.reshape(-1, k))
    # weight.t() is [k, n] column-major, the layout _scaled_mm wants for its second operand.
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale_row, out_dtype=x.dtype)
    if bias is not None:
        y += bias
    return y.reshape(*lead, -1)


def check_gpu(device: torch.device, what: str) -> None:
    """FP8 GEMMs need FP8 tensor cores (compute capability 8.9: Ada, Hopper and later); `what` names the
    option that asked for them."""
    if device.type != "cuda":
        raise ValueError(f"{what}: FP8 weights run on CUDA GPUs with FP8 tensor cores; the CPU's quantized "
                         "weights are --quantization int8")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"{what}: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has "
                         "no FP8 tensor cores (8.9 or later: Ada, Hopper)")
