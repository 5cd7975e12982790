"""Mistral: the Llama decoder attending within `config.sliding_window` on every layer (Mistral-7B-v0.1's 4096;
later Mistral configs set none and attend over the whole context)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from worker_proc.models.llama import Arch, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch(cls, config: Any) -> Arch:
        return replace(super().arch(config), sliding_window=True)
