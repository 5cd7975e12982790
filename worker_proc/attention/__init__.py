"""Attention backends, chosen by name through a small registry (heavy imports stay lazy)."""

from __future__ import annotations

import importlib

from worker_proc.attention.base import AttentionBackend, ForwardMeta

_REGISTRY = {
    "torch": "worker_proc.attention.torch_backend:TorchBackend",
    "flashinfer": "worker_proc.attention.flashinfer_backend:FlashInferBackend",
}


def resolve_backend_name(name: str, device_type: str) -> str:
    if name == "auto":
        return "flashinfer" if device_type == "cuda" else "torch"
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(_REGISTRY)}")
    return name


def backend_class(name: str) -> type[AttentionBackend]:
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["AttentionBackend", "ForwardMeta", "backend_class", "resolve_backend_name"]
