"""Qwen2 / Qwen2.5: the Llama decoder with biases on q/k/v (not on o_proj or the MLP)."""

from __future__ import annotations

from typing import Any

from worker_proc.models.llama import Arch, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch(cls, config: Any) -> Arch:
        return Arch(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)
