"""Filling a model's parameters: HF safetensors (also what a GGUF file is converted to), or dummy weights."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from radixserve.model_files import GGUF_SOURCE_FILE
from worker_proc.fp8_weights import Fp8Loading
from worker_proc.models import build_model

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) for every tensor of every *.safetensors file, read one at a time."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir} (load_format='dummy' needs only config.json)")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Norm weights 1, everything else N(0, 0.02), a function of (seed, name, shard) only.

    Each full tensor is generated whole on the parameter's device and sharded by its weight_loader, so
    TP ranks hold exactly the shards of what one rank would hold (on the same kind of device).
    """
    for name, param in model.named_parameters():
        for shard_id, shape in param.shards.items():
            if name.endswith("norm.weight"):
                full = torch.ones(shape, dtype=param.dtype, device=param.device)
            else:
                gen = torch.Generator(device=param.device)
                gen.manual_seed(zlib.crc32(f"{seed}:{name}:{shard_id}".encode()))
                full = torch.empty(shape, dtype=param.dtype, device=param.device).normal_(0.0, 0.02, generator=gen)
            param.weight_loader(param, full, shard_id)


def load_model(model_dir: str | Path, hf_config: Any, load_format: str, dtype: torch.dtype,
               device: torch.device | str, seed: int = 0, quantization: str | None = None) -> nn.Module:
    """Build our model for `hf_config` and fill it (`model_dir` as returned by resolve_model).

    'auto' and 'safetensors' read the directory's *.safetensors; 'gguf' the same, but insists the
    directory is a converted GGUF file; 'dummy' needs only the config. FP8 weights (--quantization fp8, or a
    checkpoint's quantization_config) are worker_proc.fp8_weights'.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r}: choose from {LOAD_FORMATS}")
    model = build_model(hf_config, dtype, device)
    fp8 = Fp8Loading.of(hf_config, quantization, load_format, torch.device(device))
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        if load_format == "gguf" and not (Path(model_dir) / GGUF_SOURCE_FILE).exists():
            raise ValueError(f"{model_dir} is not a converted GGUF file: pass the .gguf path through resolve_model")
        tensors = iter_safetensors(model_dir)
        if fp8 is not None:
            fp8.prepare(model)
            tensors = fp8.weights(tensors)
        with torch.no_grad():
            model.load_weights(tensors)
    if fp8 is not None:
        fp8.finish(model)
    return model.eval()
