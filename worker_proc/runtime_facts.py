"""What a worker resolves at start-up from its flags, the model's config and the machine: its device, dtype,
context length and how many KV slots fit."""

from __future__ import annotations

import logging

import torch

from radixserve.config import ServerArgs
from radixserve.nodes import NodeLayout
from worker_proc import cpu_kernels

log = logging.getLogger("radixserve.worker")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(args: ServerArgs, rank: int) -> torch.device:
    """--device (auto: CUDA where there is one), on CUDA this rank's GPU of its node."""
    kind = args.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.base_gpu_id + NodeLayout.of(args).local_index(rank)
    return torch.device(f"cuda:{gpu}") if kind == "cuda" else torch.device("cpu")


def resolve_dtype(flag: str, device: torch.device) -> torch.dtype:
    """--dtype, or with auto bfloat16 on CUDA and on CPUs with native bf16 arithmetic, float32 elsewhere."""
    if flag != "auto":
        return DTYPES[flag]
    return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32


def serving_context_length(requested: int | None, hf_config) -> int:
    """--context-length (or the model's), capped where the model stops being exact."""
    # Positions past the model's rotary table have no embedding: never serve beyond it.
    positions = hf_config.max_position_embeddings
    length = min(requested or positions, positions)
    if requested and requested > length:
        log.warning("--context-length %d exceeds the model's %d positions: using %d", requested, length, length)
    return length


def kv_slots_that_fit(args: ServerArgs, device: torch.device, context_length: int, bytes_per_token: int) -> int:
    """--max-total-tokens, or the KV slots that --mem-fraction-static's share of the memory holds (of the GPU
    after everything else is allocated; of a quarter of the host's available memory on the CPU), at most what
    every req slot at full context needs."""
    if args.max_total_tokens:
        return args.max_total_tokens
    cap = args.max_running_requests * context_length
    if device.type == "cuda":
        torch.cuda.empty_cache()  # loading's temporaries are not "used"
        free, total = torch.cuda.mem_get_info(device)
        budget = total * args.mem_fraction_static - (total - free)
    else:
        budget = _mem_available() * 0.25 * args.mem_fraction_static
    return max(1, min(cap, int(budget // bytes_per_token)))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), so bf16 weights halve the bytes a
    decode step reads without emulated arithmetic eating the gain."""
    flags = cpu_kernels.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30
