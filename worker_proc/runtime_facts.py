"""What a worker resolves at start-up from its flags, the model's config and the machine: its device, dtype,
context length and how many KV slots fit."""

from __future__ import annotations

import logging
from typing import Any

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


def step_activation_bytes(args: ServerArgs, hf_config: Any, elem_bytes: int) -> int:
    """The transient memory of the largest step the scheduler may send (--max-prefill-tokens, or one chunk of
    --chunked-prefill-size if larger), counted as each token's widest tensors alive at once: the MLP's gate_up
    output and its activation (3 x its intermediate width on this rank; for a mixture of experts, the routed
    experts' together) and a few hidden-size buffers (residual, normed input, attention output, qkv)."""
    tokens = max(args.max_prefill_tokens, args.chunked_prefill_size)
    inter = getattr(hf_config, "intermediate_size", None) or 4 * hf_config.hidden_size
    experts = getattr(hf_config, "num_experts_per_tok", None)
    if experts and getattr(hf_config, "moe_intermediate_size", None):
        inter = max(inter, experts * hf_config.moe_intermediate_size)
    return tokens * (3 * inter // args.tp_size + 6 * hf_config.hidden_size) * elem_bytes


def kv_slots_that_fit(args: ServerArgs, device: torch.device, context_length: int, bytes_per_token: int,
                      step_bytes: int = 0) -> int:
    """--max-total-tokens, or the KV slots that --mem-fraction-static's share of the memory holds (of the GPU
    after everything else is allocated and `step_bytes`, the largest step's activations, are set aside; of a
    quarter of the host's available memory on the CPU), at most what every req slot at full context needs."""
    if args.max_total_tokens:
        return args.max_total_tokens
    cap = args.max_running_requests * context_length
    if device.type == "cuda":
        torch.cuda.empty_cache()  # loading's temporaries are not "used"
        free, total = torch.cuda.mem_get_info(device)
        budget = total * args.mem_fraction_static - (total - free) - step_bytes
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
