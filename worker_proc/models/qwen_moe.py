"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 decoder whose MLP is a sparse mixture of experts on the layers
the config names (every `decoder_sparse_step`-th layer not in `mlp_only_layers`; the others keep a dense MLP of
`intermediate_size`). Routing: softmax over `num_experts`, top `num_experts_per_tok`, renormalised when
`norm_topk_prob`. Qwen2-MoE adds a shared expert (a dense MLP of `shared_expert_intermediate_size`) scaled by
sigmoid(shared_expert_gate(x)). Checkpoints: `mlp.experts.{i}.{gate,up,down}_proj.weight`, `mlp.gate.weight`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker_proc.models.llama import Arch, Device, LlamaForCausalLM, LlamaMLP
from worker_proc.moe import Routing, SparseMoeBlock, expert_param_name, reject_sliding_window


def _is_sparse(config: Any, layer_id: int) -> bool:
    return layer_id not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0 \
        and (layer_id + 1) % config.decoder_sparse_step == 0


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    shared_expert = False

    @classmethod
    def arch(cls, config: Any) -> Arch:
        bias = getattr(config, "attention_bias", False)
        return Arch(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True, mlp=cls.build_mlp)

    @classmethod
    def build_mlp(cls, config: Any, layer_id: int, dtype: torch.dtype, device: Device) -> nn.Module:
        dense = Arch(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)
        if not _is_sparse(config, layer_id):
            return LlamaMLP(config, dense, dtype, device)
        if config.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported (silu is)")
        routing = Routing(config.num_experts, config.num_experts_per_tok, bool(config.norm_topk_prob),
                          round_weights=True)
        shared = LlamaMLP(config, dense, dtype, device, config.shared_expert_intermediate_size, reduce=False) \
            if cls.shared_expert else None
        return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, routing, shared, dtype, device)

    def __init__(self, config: Any, dtype: torch.dtype, device: Device) -> None:
        reject_sliding_window(config)
        super().__init__(config, dtype, device)

    def param_name(self, hf_name: str) -> tuple[str, Any]:
        return expert_param_name(hf_name, "gate_proj", "up_proj", "down_proj") or super().param_name(hf_name)


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    shared_expert = True

    @classmethod
    def arch(cls, config: Any) -> Arch:
        return Arch(qkv_bias=getattr(config, "qkv_bias", True), o_bias=False, mlp_bias=False, qk_norm=False,
                    mlp=cls.build_mlp)
