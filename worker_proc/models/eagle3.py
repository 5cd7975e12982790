"""The EAGLE-3 draft head, in the public checkpoint layout (as SGLang's and the EAGLE repo's Llama EAGLE-3 heads):

  fc.weight                          [H, 3 * H_target]: the three captured target hidden states -> H
  midlayer.input_layernorm.weight    the token embedding's norm
  midlayer.hidden_norm.weight        the hidden state's norm
  midlayer.self_attn.{q,k,v}_proj    over [norm(embedding) | norm(hidden)] (2H in)
  midlayer.self_attn.o_proj, midlayer.post_attention_layernorm, midlayer.mlp.{gate,up,down}_proj, norm.weight
  lm_head.weight                     [draft_vocab_size, H]
  d2t                                [draft_vocab_size] int64: target id = draft id + d2t[draft id]
  t2d                                [vocab_size] bool (unused here)

The token embedding is the target's (heads ship without one). One decoder layer; its residual stream starts at
the hidden state, and the pre-norm output is the hidden state of the next draft step (where fc does not apply).
The target's captured layers: config.eagle_config.eagle_aux_hidden_state_layer_ids (each + 1: the input of the
layer after), else SGLang's default for Llama, the inputs of layers 2, L // 2 and L - 3.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from worker_proc.attention.base import AttentionBackend, LayerAttention
from worker_proc.layers import (
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    linear,
    load_replicated,
    make_param,
    rope_parameters,
)
from worker_proc.models.llama import Arch, LlamaAttention, LlamaMLP, _param_name, head_dim_of


def capture_layers(head_config: Any, target_layers: int) -> tuple[int, ...]:
    """The target layers whose input hidden states (the residual stream) the head reads, in layer order."""
    ids = getattr(getattr(head_config, "eagle_config", None) or {}, "get", lambda *_: None)(
        "eagle_aux_hidden_state_layer_ids")
    layers = tuple(i + 1 for i in ids) if ids else (2, target_layers // 2, target_layers - 3)
    if len(set(layers)) != 3 or not all(0 <= i <= target_layers for i in layers):
        raise ValueError(f"EAGLE-3 reads three distinct target layers; {layers} for a target of {target_layers}")
    return tuple(sorted(layers))


class Eagle3Layer(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        h, head_dim = config.hidden_size, head_dim_of(config)
        wide = types.SimpleNamespace(**{**vars(config), "hidden_size": 2 * h, "head_dim": head_dim})
        self.self_attn = LlamaAttention(wide, 0, LayerAttention(head_dim**-0.5), False, False, None, dtype, device)
        self.self_attn.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, h, False, dtype, device)
        arch = Arch(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)
        self.mlp = LlamaMLP(config, arch, dtype, device)
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps, dtype, device)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, rope, attn: AttentionBackend):
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        x, residual = self.post_attention_layernorm(self.self_attn(x, rope, attn), hidden)
        return self.mlp(x), residual


class Eagle3Head(nn.Module):
    """forward(ids, positions, hidden, attn, embed, from_target) -> (normed for the LM head, next hidden)."""

    def __init__(self, config: Any, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        h = self.hidden_size = config.hidden_size
        self.target_hidden = getattr(config, "target_hidden_size", None) or h
        self.fc = nn.Module()
        self.fc.weight = make_param((h, 3 * self.target_hidden), dtype, device, load_replicated,
                                    {None: (h, 3 * self.target_hidden)})
        self.rotary = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings, rope_parameters(config),
                                      device)
        self.midlayer = Eagle3Layer(config, dtype, device)
        self.norm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.lm_head = ParallelLMHead(self.draft_vocab, h, dtype, device)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab, dtype=torch.int64, device=device))
        attn = self.midlayer.self_attn
        self.num_layers, self.vocab_size = 1, config.vocab_size
        self.num_q_heads_local, self.num_kv_heads_local, self.head_dim = attn.num_heads, attn.num_kv_heads, \
            attn.head_dim
        self.attention_layers = (attn.attention,)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                attn: AttentionBackend, embed: nn.Module, from_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden`: the target's three captured states [T, 3 H_target] (`from_target`) or the head's own previous
        output [T, H]."""
        if from_target:
            hidden = self.from_target(hidden)
        embeds = embed(input_ids)
        x, residual = self.midlayer(embeds, hidden, self.rotary(positions, embeds.dtype), attn)
        return self.norm(x, residual)

    def from_target(self, states: torch.Tensor) -> torch.Tensor:
        """The target's three captured states [T, 3 H_target] as the head's hidden state [T, H] (fc)."""
        return linear(states, self.fc.weight, None, None)

    def draft_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """Greedy drafts in the target's vocabulary."""
        best = self.lm_head(normed).argmax(dim=-1)
        return best + self.d2t[best]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name == "d2t":
                self.d2t.copy_(tensor.to(torch.int64))
                continue
            if name in ("t2d", "embed_tokens.weight"):  # the target's embedding serves
                continue
            target, shard_id = _param_name(name)
            param = params.get(target)
            if param is None or shard_id not in param.shards:
                raise KeyError(f"EAGLE-3 checkpoint tensor {name!r} matches no parameter of the head")
            param.weight_loader(param, tensor, shard_id)
            loaded.add((target, shard_id))
        missing = [n for n, p in params.items() for s in p.shards if (n, s) not in loaded]
        if missing:
            raise ValueError(f"EAGLE-3 head weights never loaded: {', '.join(missing[:8])}")
