"""Gemma 2 and the text model of Gemma 3 (HF's Gemma2ForCausalLM / Gemma3ForCausalLM).

What differs from the Llama decoder (worker_proc.models.llama), after HF's modeling files:
  - embeddings scaled by sqrt(hidden_size) (rounded to the weights' dtype, as HF does);
  - RMSNorm scaling by (1 + weight) in float32 (GemmaRMSNorm), and four norms per layer: input, after
    attention, before and after the MLP (both residual adds follow a post-norm);
  - the MLP gate is tanh-approximated GELU (`hidden_activation` gelu_pytorch_tanh);
  - attention scaled by query_pre_attn_scalar ** -0.5, scores soft-capped by attn_logit_softcapping where the
    config sets it (Gemma 2), final logits by final_logit_softcapping (Gemma 2);
  - `layer_types` interleaves sliding_attention layers (within config.sliding_window) and full_attention ones;
  - Gemma 3 only: per-head q/k norms (GemmaRMSNorm) before RoPE, and one RoPE table per layer type
    (`rope_parameters[layer_type]`: the local base rope_local_base_freq for sliding layers, the global base
    and its scaling for full ones).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker_proc.attention.base import AttentionBackend, LayerAttention
from worker_proc.layers import (
    GeluTanhAndMul,
    GemmaRMSNorm,
    MergedColumnParallelLinear,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    rope_parameters,
)
from worker_proc.models.llama import Device, LlamaAttention, LlamaForCausalLM, Rope, head_dim_of

LAYER_TYPES = ("sliding_attention", "full_attention")


class GemmaMLP(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise NotImplementedError(f"hidden_activation {act!r} is not supported (gelu_pytorch_tanh is)")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], False, dtype, device)
        self.act = GeluTanhAndMul()
        self.down_proj = RowParallelLinear(inter, config.hidden_size, False, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, qk_norm: bool, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_id]
        window = config.sliding_window if self.layer_type == "sliding_attention" else None
        attention = LayerAttention(config.query_pre_attn_scalar**-0.5, window,
                                   getattr(config, "attn_logit_softcapping", None))
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = LlamaAttention(config, layer_id, attention, bias, bias, GemmaRMSNorm if qk_norm else None,
                                        dtype, device)
        self.mlp = GemmaMLP(config, dtype, device)
        norm = (config.hidden_size, config.rms_norm_eps, dtype, device)
        self.input_layernorm = GemmaRMSNorm(*norm)
        self.post_attention_layernorm = GemmaRMSNorm(*norm)
        self.pre_feedforward_layernorm = GemmaRMSNorm(*norm)
        self.post_feedforward_layernorm = GemmaRMSNorm(*norm)

    def forward(self, x: torch.Tensor, ropes: dict[str, Rope], attn: AttentionBackend) -> torch.Tensor:
        """x: the residual stream before this layer -> after it."""
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), ropes[self.layer_type], attn))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: Any, per_type_rope: bool, qk_norm: bool, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        unknown = set(config.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise NotImplementedError(f"layer_types {sorted(unknown)} are not supported ({', '.join(LAYER_TYPES)} are)")
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError("use_bidirectional_attention is not supported (causal attention is)")
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, device)
        # sqrt(hidden_size) rounded to the weights' dtype, as HF's embed_scale buffer is before multiplying.
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5, dtype=dtype))
        head_dim = head_dim_of(config)
        self.rotary = nn.ModuleDict({
            kind: RotaryEmbedding(head_dim, config.max_position_embeddings,
                                  rope_parameters(config, kind if per_type_rope else None), device)
            for kind in dict.fromkeys(config.layer_types)})
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i, qk_norm, dtype, device)
                                    for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale
        ropes = {kind: rotary(positions, x.dtype) for kind, rotary in self.rotary.items()}
        for layer in self.layers:
            x = layer(x, ropes, attn)
        return self.norm(x)


class Gemma2ForCausalLM(LlamaForCausalLM):
    per_type_rope = False  # one RoPE table for every layer
    qk_norm = False

    def __init__(self, config: Any, dtype: torch.dtype, device: Device) -> None:
        super().__init__(config, dtype, device)
        self.final_soft_cap = getattr(config, "final_logit_softcapping", None)

    def decoder(self, config: Any, dtype: torch.dtype, device: Device) -> nn.Module:
        return GemmaModel(config, self.per_type_rope, self.qk_norm, dtype, device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_soft_cap is None:
            return logits
        return torch.tanh(logits / self.final_soft_cap) * self.final_soft_cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    per_type_rope = True  # rope_parameters per layer type (local and global bases)
    qk_norm = True
