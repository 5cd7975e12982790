"""Mixtral: the Llama decoder whose every MLP is a sparse mixture of `num_local_experts` experts of
`intermediate_size`; routing: softmax, top `num_experts_per_tok`, always renormalised, weights kept in float32
(as HF). Checkpoints: `block_sparse_moe.experts.{i}.w1` (gate), `.w3` (up), `.w2` (down), `block_sparse_moe.gate`;
our module is `mlp`, as in the other models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker_proc.models.llama import Arch, Device, LlamaForCausalLM
from worker_proc.moe import Routing, SparseMoeBlock, expert_param_name, reject_sliding_window


class MixtralForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch(cls, config: Any) -> Arch:
        return Arch(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, mlp=cls.build_mlp)

    @staticmethod
    def build_mlp(config: Any, layer_id: int, dtype: torch.dtype, device: Device) -> nn.Module:
        if config.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported (silu is)")
        routing = Routing(config.num_local_experts, config.num_experts_per_tok, renormalize=True, round_weights=False)
        return SparseMoeBlock(config.hidden_size, config.intermediate_size, routing, None, dtype, device)

    def __init__(self, config: Any, dtype: torch.dtype, device: Device) -> None:
        reject_sliding_window(config)
        super().__init__(config, dtype, device)

    def param_name(self, hf_name: str) -> tuple[str, Any]:
        hf_name = hf_name.replace(".block_sparse_moe.", ".mlp.")
        return expert_param_name(hf_name, "w1", "w3", "w2") or super().param_name(hf_name)
