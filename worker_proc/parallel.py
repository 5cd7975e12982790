"""Tensor-parallel group helpers over torch.distributed (one process per rank, the default world group).

Before `init_tp` (or with one rank) every collective is a no-op, so single-device code needs no branches.
With nccl the caller selects the rank's CUDA device (`torch.cuda.set_device`) before `init_tp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class _TPGroup:
    rank: int
    size: int
    device: torch.device  # where collectives of Python scalars (tp_min) run: cpu for gloo, cuda for nccl


_group: _TPGroup | None = None


def init_tp(rank: int, world_size: int, init_method: str, backend: str) -> None:
    """Join the TP group (`backend`: gloo on CPU, nccl on CUDA; `init_method` e.g. tcp://127.0.0.1:port)."""
    global _group
    if _group is not None:
        raise RuntimeError("tensor parallelism is already initialised in this process")
    if world_size > 1:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    _group = _TPGroup(rank, world_size, device)


def destroy_tp() -> None:
    global _group
    if _group is not None and _group.size > 1:
        dist.destroy_process_group()
    _group = None


def tp_rank() -> int:
    return _group.rank if _group else 0


def tp_size() -> int:
    return _group.size if _group else 1


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (x is returned)."""
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape on all ranks) along `dim`, in rank order."""
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def tp_min(value: int) -> int:
    """The minimum of a Python int over ranks (e.g. to agree on the KV pool size); syncs the host."""
    if tp_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_group.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def tp_broadcast(x: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Rank 0's `x` on every rank (the others pass None); stream-ordered, no host sync with nccl."""
    if tp_size() == 1:
        assert x is not None
        return x
    if x is None:
        x = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(x, src=0)
    return x
