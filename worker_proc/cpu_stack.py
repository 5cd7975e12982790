"""A CPU step's whole decoder stack in one call (cpu_kernels.c's rs_decoder_stack).

Each layer of a plain Llama-family model (LlamaModel with Arch.plain: no per-head q/k norms, a SiLU MLP) runs the
same cpu_kernels, in the same order and on the same operands, as LlamaDecoderLayer.forward does through
`packed` and the torch backend's native attention, so the numbers are the same; what goes is the Python between
them (about 270 calls a step for a 30-layer model, each with its module dispatch, checks and allocations), which
on a small model costs as much as the kernels (docs/quantization.md). The layers' weights, norms and KV caches
are described once to C (ctypes structures) and described again only when a layer's packed weight or the KV
cache changes.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch

from worker_proc import batch_invariant, cpu_kernels
from worker_proc.attention.base import AttentionBackend
from worker_proc.attention.torch_backend import TorchBackend
from worker_proc.cpu_linears import SplitLinear
from worker_proc.layers import PackedSlot
from worker_proc.parallel import tp_size

_ptr, _long = ctypes.c_void_p, ctypes.c_long


class _Linear(ctypes.Structure):
    """rs_linear: a linear layer's packed weight (bits 16: bf16; 4 or 8: codes, scale, offset, fp16 where half)
    and bias."""

    _fields_ = [("weight", _ptr), ("scale", _ptr), ("offset", _ptr), ("bias", _ptr), ("bits", _long), ("n", _long),
                ("k", _long), ("bk", _long), ("half", _long)]


class _Layer(ctypes.Structure):
    """rs_layer."""

    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear),
                ("down", _Linear), ("k_cache", _ptr), ("v_cache", _ptr)]


def _ptr_of(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear(module: Any) -> _Linear:
    weight, scale, offset, bits, block, half = module.packed.stack_fields()
    return _Linear(_ptr_of(weight), _ptr_of(scale), _ptr_of(offset), _ptr_of(module.bias), bits,
                   module.packed.n, module.packed.k, block, half)


class DecoderStack:
    """rs_decoder_stack's description of one model's layers over one KV cache."""

    def __init__(self, model: Any, linears: list[Any], kv_cache: Any) -> None:
        first = model.layers[0]
        self.eps = first.input_layernorm.eps
        self.final_norm = model.norm.weight
        attn = first.self_attn
        self.q_heads, self.kv_heads, self.dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale = attn.attention.scale
        # A layer whose weight oneDNN runs from some row count (cpu_linears.SplitLinear) keeps steps of that many
        # rows out of the stack, which runs the AVX512 layout only.
        self.rows_below = min((m.packed.from_rows for m in linears if isinstance(m.packed, SplitLinear)),
                              default=math.inf)
        self.layers = (_Layer * len(model.layers))()
        for i, layer in enumerate(model.layers):
            a, mlp = layer.self_attn, layer.mlp
            self.layers[i] = _Layer(layer.input_layernorm.weight.data_ptr(),
                                    layer.post_attention_layernorm.weight.data_ptr(), _linear(a.qkv_proj),
                                    _linear(a.o_proj), _linear(mlp.gate_up_proj), _linear(mlp.down_proj),
                                    kv_cache.k[i].data_ptr(), kv_cache.v[i].data_ptr())

    @staticmethod
    def key_of(kv_cache: Any) -> tuple:
        """What the description depends on: the packed weights (no layer's changed since: layers.PackedSlot)
        and the KV cache."""
        return id(kv_cache), kv_cache.k[0].data_ptr(), PackedSlot.generation

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: TorchBackend) -> torch.Tensor:
        cos, sin = rope
        row_slots, row_lens = (r.contiguous() for r in attn.rows)
        req_to_token = attn.meta.req_to_token
        out = torch.empty_like(x)
        failed = cpu_kernels.library().rs_decoder_stack(
            ctypes.addressof(self.layers), len(self.layers), x.data_ptr(), x.shape[0], x.shape[1], self.q_heads,
            self.kv_heads, self.dim, self.eps, self.scale, cos.data_ptr(), sin.data_ptr(), cos.stride(0),
            attn.out_slots.data_ptr(), req_to_token.data_ptr(), req_to_token.stride(0), row_slots.data_ptr(),
            row_lens.data_ptr(), self.final_norm.data_ptr(), out.data_ptr())
        if failed:
            raise MemoryError(f"rs_decoder_stack: no scratch memory for {x.shape[0]} tokens")
        return out


def stack_for(model: Any, x: torch.Tensor, attn: AttentionBackend) -> DecoderStack | None:
    """The model's DecoderStack where this step can run it (a plain Llama-family model on the CPU in bf16, every
    linear packed for cpu_kernels, one rank, the torch backend reading the cache in place, no hidden states kept
    for a drafter, not --enable-deterministic-inference, fewer rows than any layer runs through oneDNN), else None:
    run the layers one by one."""
    if not (isinstance(attn, TorchBackend) and attn.native and x.dtype == torch.bfloat16 and model.plain
            and not model.capture and tp_size() == 1 and not batch_invariant.ENABLED and x.is_contiguous()):
        return None
    key = DecoderStack.key_of(attn.kv_cache)
    cached = model.__dict__.get("_stack")
    if cached is None or cached[0] != key:
        linears = [m for layer in model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                         layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        runs = all(hasattr(m.packed, "stack_fields") for m in linears)
        cached = model._stack = (key, DecoderStack(model, linears, attn.kv_cache) if runs else None)
    stack = cached[1]
    return None if stack is None or x.shape[0] >= stack.rows_below else stack
