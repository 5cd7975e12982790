"""Qwen3: the Llama decoder with per-head RMSNorm of q and k, and an explicit head_dim (read by the base)."""

from __future__ import annotations

from typing import Any

from worker_proc.models.llama import Arch, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch(cls, config: Any) -> Arch:
        bias = getattr(config, "attention_bias", False)
        return Arch(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)
