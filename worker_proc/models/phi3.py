"""Phi-3: the Llama decoder with LongRoPE scaling (worker_proc.layers), `config.sliding_window` on every layer,
and checkpoints that store q/k/v and gate/up fused (`qkv_proj`, `gate_up_proj`), split here on loading."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from worker_proc.models.llama import Arch, LlamaForCausalLM, head_dim_of


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch(cls, config: Any) -> Arch:
        return replace(super().arch(config), sliding_window=True)

    def __init__(self, config: Any, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(config, dtype, device)
        head_dim = head_dim_of(config)
        kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
        self.qkv_rows = [config.num_attention_heads * head_dim, kv, kv]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._unfused(weights))

    def _unfused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """HF's fused tensors as the separate q/k/v and gate/up tensors the Llama loader takes."""
        for name, tensor in weights:
            if ".qkv_proj." in name:
                for part, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.split(self.qkv_rows)):
                    yield name.replace(".qkv_proj.", f".{part}."), rows
            elif ".gate_up_proj." in name:
                gate, up = tensor.chunk(2)
                yield name.replace(".gate_up_proj.", ".gate_proj."), gate
                yield name.replace(".gate_up_proj.", ".up_proj."), up
            else:
                yield name, tensor
