"""Model registry: `build_model(hf_config, dtype, device)` picks our class from the HF config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker_proc.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from worker_proc.models.llama import LlamaForCausalLM
from worker_proc.models.mistral import MistralForCausalLM
from worker_proc.models.mixtral import MixtralForCausalLM
from worker_proc.models.phi3 import Phi3ForCausalLM
from worker_proc.models.qwen2 import Qwen2ForCausalLM
from worker_proc.models.qwen3 import Qwen3ForCausalLM
from worker_proc.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODELS: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    # mixture of experts
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "mixtral": "MixtralForCausalLM"}


def model_class(hf_config: Any) -> type[LlamaForCausalLM]:
    """Keyed by `architectures[0]`, falling back on `model_type` when architectures is absent."""
    archs = getattr(hf_config, "architectures", None) or []
    model_type = getattr(hf_config, "model_type", None)
    name = archs[0] if archs else _BY_MODEL_TYPE.get(model_type or "")
    if name not in MODELS:
        raise ValueError(f"unsupported model: architectures={archs}, model_type={model_type!r}; "
                         f"supported: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(hf_config: Any, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Parameters are allocated (uninitialised) on `device`; fill them with `load_weights`."""
    return model_class(hf_config)(hf_config, dtype, device)


__all__ = ["MODELS", "build_model", "model_class"]
