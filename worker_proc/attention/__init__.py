"""Attention backends, chosen by name through a small registry (heavy imports stay lazy)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from worker_proc.attention.base import AttentionBackend, ForwardMeta

if TYPE_CHECKING:
    from radixserve.config import ServerArgs

_REGISTRY = {
    "torch": "worker_proc.attention.torch_backend:TorchBackend",
    "flashinfer": "worker_proc.attention.flashinfer_backend:FlashInferBackend",
    "invariant": "worker_proc.attention.invariant_backend:InvariantBackend",
}


def resolve_backend_name(args: ServerArgs, device_type: str) -> str:
    """The backend a worker runs for --attention-backend; with --enable-deterministic-inference on CUDA, the
    batch-invariant Triton attention (FlashInfer's kernels order a row's sums by the step's shape)."""
    name = args.attention_backend  # ServerArgs allows auto, flashinfer and torch
    if device_type == "cuda" and args.enable_deterministic_inference and name != "torch":
        return "invariant"
    if name == "auto":
        return "flashinfer" if device_type == "cuda" else "torch"
    return name


def backend_class(name: str) -> type[AttentionBackend]:
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["AttentionBackend", "ForwardMeta", "backend_class", "resolve_backend_name"]
