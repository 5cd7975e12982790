"""The Llama-family decoder (SmolLM2, Llama 2/3); Mistral, Phi-3, Qwen2 and Qwen3 reuse it through `Arch` flags.

Module names follow HF's, except the fused `qkv_proj` (q/k/v_proj) and `gate_up_proj` (gate/up_proj).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worker_proc import cpu_stack
from worker_proc.attention.base import AttentionBackend, LayerAttention
from worker_proc.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    rope_parameters,
)

Device = torch.device | str
Rope = tuple[torch.Tensor, torch.Tensor]

# (fused parameter, HF parameter, shard id); checkpoint names are matched on ".<HF parameter>."
_STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
            ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@dataclass(frozen=True)
class Arch:
    """What distinguishes the members of the family."""

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm of q and k before RoPE (Qwen3)
    mlp: Callable[[Any, int, torch.dtype, Device], nn.Module] | None = None  # (config, layer_id, ..): the layer's
    # MLP where it is not LlamaMLP (mixture-of-experts models)
    sliding_window: bool = False  # every layer attends within config.sliding_window (Mistral, Phi-3)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: Any) -> int | None:
    """config.sliding_window where it narrows attention; None where the config sets none or one no shorter than
    max_position_embeddings (Phi-3-mini-128k's 262144: the whole context)."""
    window = getattr(config, "sliding_window", None)
    return window if window is not None and window < config.max_position_embeddings else None


class LlamaAttention(nn.Module):
    """qkv projection, optional per-head q/k norms (`qk_norm`: their class), RoPE + attention as `attention`
    says, o projection; Gemma's attention is this one with its own norms and LayerAttention."""

    def __init__(self, config: Any, layer_id: int, attention: LayerAttention, qkv_bias: bool, o_bias: bool,
                 qk_norm: type[nn.Module] | None, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = head_dim_of(config)
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads,
                                          qkv_bias, dtype, device)
        self.num_heads = self.qkv_proj.num_q_heads_local
        self.num_kv_heads = self.qkv_proj.num_kv_heads_local
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size, o_bias, dtype, device)
        self.q_norm = qk_norm(self.head_dim, config.rms_norm_eps, dtype, device) if qk_norm else None
        self.k_norm = qk_norm(self.head_dim, config.rms_norm_eps, dtype, device) if qk_norm else None
        self.attention = attention

    def forward(self, x: torch.Tensor, rope: Rope, attn: AttentionBackend) -> torch.Tensor:
        heads = self.qkv_proj(x).view(x.shape[0], -1, self.head_dim)  # [T, q heads | k heads | v heads, D]
        qk, v = heads.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        out = attn.forward_rotary(qk, v, *rope, self.layer_id)  # q and k rotated together
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, arch: Arch, dtype: torch.dtype, device: Device,
                 intermediate_size: int | None = None, reduce: bool = True) -> None:
        """`intermediate_size`: where not config.intermediate_size; `reduce=False`: down's partial sum, not
        all-reduced (a MoE model's shared expert, summed with the experts' before one all-reduce)."""
        super().__init__()
        if config.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported (silu is)")
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], arch.mlp_bias, dtype, device)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(inter, config.hidden_size, arch.mlp_bias, dtype, device, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, arch: Arch, layer_id: int, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        window = sliding_window_of(config) if arch.sliding_window else None
        self.self_attn = LlamaAttention(config, layer_id, LayerAttention(head_dim_of(config)**-0.5, window),
                                        arch.qkv_bias, arch.o_bias, RMSNorm if arch.qk_norm else None, dtype, device)
        self.mlp = arch.mlp(config, layer_id, dtype, device) if arch.mlp else LlamaMLP(config, arch, dtype, device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: Rope,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it); their sum is the hidden state."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, rope, attn), residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, arch: Arch, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, device)
        self.rotary = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings,
                                      rope_parameters(config), device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, arch, i, dtype, device)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        # Every layer is LlamaDecoderLayer with LlamaMLP and no q/k norms: cpu_stack can run the stack in one call.
        self.plain = arch.mlp is None and not arch.qk_norm
        # EAGLE-3 (worker_proc/models/eagle3.py): the inputs of these layers (len(layers): the final pre-norm
        # state) are kept in `aux` [T, n * hidden] after each forward.
        self.capture: tuple[int, ...] = ()
        self.aux: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        stack = cpu_stack.stack_for(self, x, attn) if x.device.type == "cpu" else None
        if stack is not None:
            return stack(x, rope, attn)
        residual = None
        kept = []
        for i, layer in enumerate(self.layers):
            if i in self.capture:
                kept.append(x if residual is None else x + residual)
            x, residual = layer(x, residual, rope, attn)
        if len(self.layers) in self.capture:
            kept.append(x + residual)
        self.aux = torch.cat(kept, dim=-1) if kept else None
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """forward: a flat ragged batch of new tokens -> final hidden states; compute_logits: -> full-vocab logits."""

    @classmethod
    def arch(cls, config: Any) -> Arch:
        bias = getattr(config, "attention_bias", False)
        return Arch(qkv_bias=bias, o_bias=bias, mlp_bias=getattr(config, "mlp_bias", False), qk_norm=False)

    def __init__(self, config: Any, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError(f"use_sliding_window is not supported for {type(self).__name__}")
        self.model = self.decoder(config, dtype, device)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype, device,
                                      tied_to=self.model.embed_tokens if self.tie_word_embeddings else None)
        attn = self.model.layers[0].self_attn
        self.num_layers = config.num_hidden_layers
        self.num_q_heads_local, self.num_kv_heads_local = attn.num_heads, attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.vocab_size = config.vocab_size
        self.attention_layers = tuple(layer.self_attn.attention for layer in self.model.layers)

    def decoder(self, config: Any, dtype: torch.dtype, device: Device) -> nn.Module:
        """The decoder stack (`embed_tokens`, `layers` with a `self_attn` each, ...): (input_ids, positions, attn) ->
        final hidden states."""
        return LlamaModel(config, self.arch(config), dtype, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """input_ids, positions [T] -> hidden [T, hidden_size]."""
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> float32 logits [N, vocab_size], the full vocab on every rank."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF tensors by HF name; every shard of every parameter must be loaded."""
        params = dict(self.named_parameters())  # a tied lm_head appears once, as model.embed_tokens.weight
        loaded: set[tuple[str, Any]] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            target, shard_id = self.param_name(name)
            param = params.get(target)
            if param is None or shard_id not in param.shards:
                raise KeyError(f"checkpoint tensor {name!r} matches no parameter of {type(self).__name__}")
            if tuple(tensor.shape) != param.shards[shard_id]:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                                 f"config implies {param.shards[shard_id]}")
            param.weight_loader(param, tensor, shard_id)
            loaded.add((target, shard_id))
        missing = [f"{n}[{s}]" if s is not None else n
                   for n, p in params.items() for s in p.shards if (n, s) not in loaded]
        if missing:
            raise ValueError(f"weights never loaded: {', '.join(missing[:8])}"
                             f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")

    def param_name(self, hf_name: str) -> tuple[str, Any]:
        """(our parameter's name, shard id) of a checkpoint tensor."""
        return _param_name(hf_name)


def _param_name(hf_name: str) -> tuple[str, Any]:
    for fused, part, shard_id in _STACKED:
        if f".{part}." in hf_name:
            return hf_name.replace(f".{part}.", f".{fused}."), shard_id
    return hf_name, None
