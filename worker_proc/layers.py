"""Model building blocks: norms, rotary embedding, activation, and tensor-parallel linear / embedding layers.

Every parameter carries two attributes that loading relies on:
  `weight_loader(param, full_tensor, shard_id=None)` copies this rank's part of a full HF tensor into it;
  `shards: dict[shard_id, full_shape]` lists the full tensors it is made of (all must be loaded once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker_proc import batch_invariant, cpu_kernels, cpu_linears, fused, gemv
from worker_proc.parallel import tp_all_gather, tp_all_reduce, tp_rank, tp_size

ShardId = Hashable  # None for a plain tensor; 0/1 for gate/up; "q"/"k"/"v" for qkv
Loader = Callable[[nn.Parameter, torch.Tensor, ShardId], None]


def make_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
               loader: Loader, shards: dict[ShardId, tuple[int, ...]]) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = loader
    param.shards = shards
    return param


def load_replicated(param: nn.Parameter, full: torch.Tensor, shard_id: ShardId = None) -> None:
    param.data.copy_(full)


PackedWeight = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, bias) -> x W^T + bias


class PackedSlot:
    """A linear layer's (or LM head's) `packed` attribute (see pack_cpu_linears): None until one is assigned, then
    the PackedWeight that runs it. Every assignment, to any layer, advances `generation`, so that a description of
    a model's packed weights (cpu_stack.DecoderStack) is known to be current by one comparison."""

    generation = 0

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
        return self if module is None else module.__dict__.get("_packed")

    def __set__(self, module: nn.Module, packed: PackedWeight | None) -> None:
        module.__dict__["_packed"] = packed
        PackedSlot.generation += 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedWeight | None) -> torch.Tensor:
    """F.linear, the CPU kernel of the weight's packed copy (see pack_cpu_linears), or for a decode batch of a
    few rows on CUDA the split-K-free GEMV (worker_proc.gemv); with --enable-deterministic-inference, the
    batch-invariant one (worker_proc.batch_invariant)."""
    if batch_invariant.ENABLED:
        return batch_invariant.linear(x, weight, bias, packed)
    if packed is not None:
        return packed(x, bias)
    config = gemv.choose(x, weight)
    if config is not None:
        return gemv.gemv(x, weight, bias, config)
    return F.linear(x, weight, bias)


def pack_cpu_linears(model: nn.Module, native: bool = True, chooser: cpu_linears.Chooser | None = None
                     ) -> tuple[int, str]:
    """Repack every bfloat16 linear weight of a CPU model once after loading: into cpu_kernels' layout where
    that library builds (and `native`), else into oneDNN's; on CPUs with AMX-BF16 (or given a `chooser`) each shape
    into the layout or layouts its timing chose (worker_proc.cpu_linears). The plain weight is freed unless another
    layer shares it (a tied LM head keeps the embedding's). A layer that already has a packed weight (quantized: see
    worker_proc.cpu_quant) keeps it. Returns (weights packed, layout); (0, "") where neither is available."""
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if native and cpu_kernels.library() is not None:
        pack, layout = cpu_kernels.PackedLinear, "cpu_kernels' AVX512-BF16"
        if chooser is None and onednn and "amx_bf16" in cpu_kernels.cpu_flags() and not batch_invariant.ENABLED:
            chooser = cpu_linears.Chooser()
        pack = chooser or pack
    elif onednn:
        pack, layout, chooser = cpu_linears.OneDnnLinear, "oneDNN's", None
    else:
        return 0, ""
    packed = 0
    for module in model.modules():
        if isinstance(module, (_ColumnLinear, RowParallelLinear, ParallelLMHead)) and module.packed is None and \
                module.weight.device.type == "cpu" and module.weight.dtype == torch.bfloat16:
            module.packed = pack(module.weight)
            if not (isinstance(module, ParallelLMHead) and module.tied):
                module.weight.data = module.weight.data.new_empty(0)
            packed += 1
    return packed, layout if chooser is None else f"{layout} ({chooser.summary()})"


def one_kernel(x: torch.Tensor, cuda: Callable[..., Any], cpu: Callable[..., Any]) -> Callable[..., Any] | None:
    """The fused kernel that replaces a few torch operators on a 2-D x's device: `cuda` (worker_proc.fused)
    while fused.ENABLED, `cpu` (cpu_kernels) for bf16 where that library built; None: run the torch code."""
    if x.dim() != 2:
        return None
    if x.is_cuda:
        return cuda if fused.ENABLED else None
    return cpu if x.dtype == torch.bfloat16 and cpu_kernels.library() is not None else None


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


class RMSNorm(nn.Module):
    """HF's RMSNorm, optionally fused with the residual add before it.

    F.rms_norm without weight normalises in float32 and rounds to x's dtype; the weight is applied after
    that rounding, as HF does (bit-identical to HF in bf16 on CUDA, two kernels instead of eight).
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = make_param((dim,), dtype, device, load_replicated, {None: (dim,)})

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """norm(x), or with `residual`: (norm(x + residual), x + residual); one kernel on CUDA (Triton) and
        on bf16 CPUs with cpu_kernels."""
        kernel = one_kernel(x, fused.add_rmsnorm, cpu_kernels.add_rmsnorm)
        if kernel is not None:
            out, residual = kernel(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        out = self.weight * F.rms_norm(x, self.weight.shape, eps=self.eps)
        return out if residual is None else (out, residual)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in float32 and rounded once to x's dtype (HF's order);
    with `residual`, the residual add (in x's dtype) comes first, as in RMSNorm."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = make_param((dim,), dtype, device, load_replicated, {None: (dim,)})

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        if residual is not None:
            x = x + residual
            residual = x
        out = (F.rms_norm(x.float(), x.shape[-1:], eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, residual)


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """RoPE settings from a transformers 5 `rope_parameters` or an older `rope_theta` + `rope_scaling` config;
    with `layer_type`, that layer type's entry of a per-layer-type `rope_parameters` (Gemma 3)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if layer_type is not None:
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _inv_freq(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Per-pair inverse frequencies, computed as HF computes them (so cos/sin match bit for bit)."""
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise NotImplementedError(f"rope_type {kind!r} is not supported (default, linear, llama3, longrope are)")


def _longrope_angles(params: dict[str, Any], head_dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): angles [max_positions, head_dim / 2] with the short factors below
    original_max_position_embeddings and the long factors from there on, and the cos/sin scale.

    HF picks one set of factors for a whole forward from its longest position, so it re-rotates a prompt that
    crosses original_max_position_embeddings with the long factors from position 0, while its cache keeps
    the short-factor keys of a sequence that grows past that point. A position here always gets the same
    rotation (what a shared prefix cache needs): equal to HF for sequences within the original length."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_positions / original
    scale = params.get("attention_factor") or (
        1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    positions = torch.arange(max_positions, dtype=torch.float32)
    short, long = (1.0 / (torch.tensor(params[key], dtype=torch.float32) * params["rope_theta"] ** shape)
                   for key in ("short_factor", "long_factor"))
    angles = torch.where(positions[:, None] < original, torch.outer(positions, short), torch.outer(positions, long))
    return angles, scale


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE from a cos/sin table indexed by position: no host sync per step."""

    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any], device: torch.device | str) -> None:
        """`max_positions`: the model's max_position_embeddings (LongRoPE derives its scale from it)."""
        super().__init__()
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError(f"partial_rotary_factor {params['partial_rotary_factor']} is not supported "
                                      "(RoPE over the whole head is)")
        if params["rope_type"] == "longrope":
            freqs, scale = _longrope_angles(params, head_dim, max_positions)
        else:
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), _inv_freq(params, head_dim))
            scale = 1.0
        # [max_positions, head_dim / 2], float32; HF scales (LongRoPE) before rounding to the activations' dtype.
        self.register_buffer("cos", (freqs.cos() * scale).to(device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scale).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, head_dim / 2] for `apply_rotary`, cast to the activations' dtype as HF does."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated pairwise (x[i], x[i + D/2]) as HF's rotate_half form, in four kernels (one fused on CUDA)."""
    if fused.ENABLED and x.is_cuda:
        return fused.rotary(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty_like(x)
    out1, out2 = out.chunk(2, dim=-1)
    torch.addcmul(x1 * cos, x2, sin, value=-1, out=out1)
    torch.addcmul(x2 * cos, x1, sin, out=out2)
    return out


class SiluAndMul(nn.Module):
    """[.., 2n] -> silu(x[.., :n]) * x[.., n:] (the gate/up halves of a merged projection); one kernel on CUDA and
    on bf16 CPUs with cpu_kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = one_kernel(x, fused.silu_and_mul, cpu_kernels.silu_and_mul)
        if kernel is not None:
            return kernel(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """[.., 2n] -> gelu_tanh(x[.., :n]) * x[.., n:]: Gemma's gated MLP (HF's gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


class _ColumnLinear(nn.Module):
    """y = x W^T + b with W's rows split over ranks; the output stays sharded (feeds a RowParallelLinear).

    W is made of full tensors (one per shard id) stacked on rows; this rank keeps rows [src, src + n) of each,
    packed in shard order: layout[shard_id] = (src, n, dst) with dst the offset in the local weight.
    """

    packed = PackedSlot()

    def __init__(self, in_features: int, shards: list[tuple[ShardId, int, int, int]], bias: bool,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        """`shards`: (shard_id, full rows, first row kept by this rank, rows kept)."""
        super().__init__()
        self.layout: dict[ShardId, tuple[int, int, int]] = {}
        dst = 0
        for shard_id, _, src, n in shards:
            self.layout[shard_id] = (src, n, dst)
            dst += n
        self.out_features_local = dst
        self.weight = make_param((dst, in_features), dtype, device, self._load,
                                 {sid: (full, in_features) for sid, full, _, _ in shards})
        self.bias = make_param((dst,), dtype, device, self._load, {sid: (full,) for sid, full, _, _ in shards}) \
            if bias else None

    def _load(self, param: nn.Parameter, full: torch.Tensor, shard_id: ShardId = None) -> None:
        src, n, dst = self.layout[shard_id]
        param.data.narrow(0, dst, n).copy_(full.narrow(0, src, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class MergedColumnParallelLinear(_ColumnLinear):
    """Several column-parallel projections of the same input in one matmul (gate_up: shard ids 0, 1)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shards = []
        for i, size in enumerate(output_sizes):
            n = divide(size, tp_size(), "output features")
            shards.append((i, size, tp_rank() * n, n))
        super().__init__(in_features, shards, bias, dtype, device)


class QKVParallelLinear(_ColumnLinear):
    """Fused q/k/v projection (shard ids "q", "k", "v"), split by heads; local output [q heads | k heads | v heads].

    Rank r holds q heads [r * Hq/tp, (r+1) * Hq/tp). With Hkv >= tp it holds kv heads [r * Hkv/tp, ...);
    with Hkv < tp each rank holds one kv head, r * Hkv // tp, replicated over tp / Hkv ranks, which is
    the kv head its q heads attend with (q head h uses kv head h // (Hq / Hkv)).
    """

    def __init__(self, hidden: int, head_dim: int, num_q_heads: int, num_kv_heads: int, bias: bool,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        tp, rank = tp_size(), tp_rank()
        self.num_q_heads_local = divide(num_q_heads, tp, "attention heads")
        if num_kv_heads >= tp:
            self.num_kv_heads_local = divide(num_kv_heads, tp, "key/value heads")
            kv_start = rank * self.num_kv_heads_local
        else:
            if tp % num_kv_heads:
                raise ValueError(f"tensor-parallel size {tp} is not a multiple of the {num_kv_heads} key/value heads")
            self.num_kv_heads_local, kv_start = 1, rank * num_kv_heads // tp
        q_rows, kv_rows = self.num_q_heads_local * head_dim, self.num_kv_heads_local * head_dim
        super().__init__(hidden, [("q", num_q_heads * head_dim, rank * q_rows, q_rows),
                                  ("k", num_kv_heads * head_dim, kv_start * head_dim, kv_rows),
                                  ("v", num_kv_heads * head_dim, kv_start * head_dim, kv_rows)],
                         bias, dtype, device)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b with W's columns split over ranks (input already sharded); with
    `reduce=False` this rank's partial sum, for a caller that adds it to others before one all-reduce."""

    packed = PackedSlot()

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str, reduce: bool = True) -> None:
        super().__init__()
        self.reduce = reduce
        self.in_local = divide(in_features, tp_size(), "input features")
        self.weight = make_param((out_features, self.in_local), dtype, device, self._load,
                                 {None: (out_features, in_features)})
        self.bias = make_param((out_features,), dtype, device, load_replicated, {None: (out_features,)}) \
            if bias else None

    def _load(self, param: nn.Parameter, full: torch.Tensor, shard_id: ShardId = None) -> None:
        param.data.copy_(full.narrow(1, tp_rank() * self.in_local, self.in_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias joins on rank 0 only, so the sum over ranks adds it exactly once.
        y = linear(x, self.weight, self.bias if tp_rank() == 0 else None, self.packed)
        return tp_all_reduce(y) if self.reduce else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks; the vocab is padded to a multiple of tp (padding rows are zero).

    Rank r holds token ids [r * V_local, (r+1) * V_local); other ids contribute zeros to the all-reduce.
    """

    packed = PackedSlot()

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, device: torch.device | str,
                 tied_to: VocabParallelEmbedding | None = None) -> None:
        """`tied_to`: share that layer's weight (same shape, so the same sharding) instead of allocating one."""
        super().__init__()
        self.vocab_size = vocab_size
        self.vocab_local = -(-vocab_size // tp_size())
        self.vocab_start = tp_rank() * self.vocab_local
        self.tied = tied_to is not None
        self.weight = tied_to.weight if tied_to is not None else \
            make_param((self.vocab_local, hidden), dtype, device, self._load, {None: (vocab_size, hidden)})

    def _load(self, param: nn.Parameter, full: torch.Tensor, shard_id: ShardId = None) -> None:
        n = max(0, min(self.vocab_local, self.vocab_size - self.vocab_start))
        param.data[:n].copy_(full.narrow(0, self.vocab_start, n))
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.vocab_local)
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine[:, None].to(self.weight.dtype)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-split output projection; `forward` returns full-vocab float32 logits on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = tp_all_gather(linear(hidden, self.weight, None, self.packed), dim=-1)
        return logits[:, : self.vocab_size].float()
