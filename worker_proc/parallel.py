"""Tensor-parallel group helpers over torch.distributed (one process per rank, the default world group).

Before `init_tp` (or with one rank) every collective is a no-op, so single-device code needs no branches.
With nccl the caller selects the rank's CUDA device (`torch.cuda.set_device`) before `init_tp`.
Small all-reduces (decode steps) can go through symmetric memory instead of NCCL: `enable_p2p_all_reduce`.
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
    ep_size: int  # ranks that MoE experts are placed over whole (worker_proc.moe); divides size


_group: _TPGroup | None = None


@dataclass(frozen=True)
class _P2PAllReduce:
    """A buffer every rank of this host maps (torch symmetric memory): one kernel copies x into it, meets the
    other ranks at a barrier, reads and sums their buffers over NVLink, and meets them again before the buffer
    can be written anew (torch's one_shot_all_reduce), so one buffer serves every call in stream order."""

    buffer: torch.Tensor  # 1-D, of the model's dtype
    group_name: str


_p2p: _P2PAllReduce | None = None
# On 2 x H200 the one-shot beats NCCL at every size up to 4 MiB (docs/benchmarks.md); with more ranks each
# reads (ranks - 1) copies, so the size it takes shrinks in proportion.
P2P_MAX_BYTES = 4 << 20


def init_tp(rank: int, world_size: int, init_method: str, backend: str, ep_size: int = 1) -> None:
    """Join the TP group (`backend`: gloo on CPU, nccl on CUDA; `init_method` e.g. tcp://127.0.0.1:port);
    `ep_size` (dividing world_size): MoE experts go whole to ep groups of ranks (--ep-size)."""
    global _group
    if _group is not None:
        raise RuntimeError("tensor parallelism is already initialised in this process")
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"--ep-size {ep_size} does not divide --tp-size {world_size}")
    if world_size > 1:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    _group = _TPGroup(rank, world_size, device, ep_size)


def enable_p2p_all_reduce(dtype: torch.dtype, devices: list[int]) -> bool:
    """Route all-reduces of `dtype` up to P2P_MAX_BYTES / (ranks - 1) through symmetric memory; collective (every rank
    calls it once, before CUDA graph capture). `devices`: every rank's CUDA device, all on this host. The ranks
    agree, so either all use it or none does (no peer access, a dtype the kernel lacks). Returns whether it is on."""
    global _p2p
    if _group is None or _group.size == 1 or _group.device.type != "cuda":
        return False
    ok = dtype in (torch.float32, torch.bfloat16) and hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
    here = _group.device.index
    ok = ok and all(torch.cuda.can_device_access_peer(here, d) for d in devices if d != here)
    if not tp_min(int(ok)):
        return False
    import torch.distributed._symmetric_memory as symm_mem

    group_name = dist.group.WORLD.group_name
    max_bytes = P2P_MAX_BYTES // (_group.size - 1)
    buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=_group.device)
    symm_mem.rendezvous(buffer, group_name)
    _p2p = _P2PAllReduce(buffer, group_name)
    return True


def destroy_tp() -> None:
    global _group, _p2p
    if _group is not None and _group.size > 1:
        dist.destroy_process_group()
    _group, _p2p = None, None


def tp_rank() -> int:
    return _group.rank if _group else 0


def tp_size() -> int:
    return _group.size if _group else 1


def ep_size() -> int:
    return _group.ep_size if _group else 1


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (x is returned)."""
    if tp_size() == 1:
        return x
    p2p = _p2p
    if p2p is None or x.dtype != p2p.buffer.dtype or x.numel() > p2p.buffer.numel() or not x.is_contiguous():
        dist.all_reduce(x)
        return x
    flat = x.view(-1)  # copied into the buffer by the kernel itself, then overwritten with the sum
    torch.ops.symm_mem.one_shot_all_reduce_copy_out(p2p.buffer[: flat.numel()], flat, "sum", p2p.group_name, flat)
    return x


def tp_max_(x: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks, in place (x is returned)."""
    if tp_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
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
