"""The KV pool leaves room for the largest step: on an H100 the Qwen2.5-7B shape ran out of memory in its first
prefill of 64 x 1024 tokens (`bench one-batch`), its gate_up output (4.55 GiB) no longer fitting beside the pool."""

from __future__ import annotations

from pathlib import Path

from radixserve.config import ServerArgs
from radixserve.model_files import load_hf_config
from worker_proc.runtime_facts import step_activation_bytes

CONFIGS = Path(__file__).resolve().parent.parent / "radixserve" / "model_configs"


def test_the_largest_step_is_set_aside_beside_the_pool() -> None:
    qwen = load_hf_config(str(CONFIGS / "qwen2.5-7b"))
    args = ServerArgs(chunked_prefill_size=65536, max_prefill_tokens=65536)
    gate_up = 65536 * 2 * qwen.intermediate_size * 2  # the tensor whose allocation failed, in bf16
    reserved = step_activation_bytes(args, qwen, 2)
    assert gate_up < reserved < 4 * gate_up
    # per rank under tensor parallelism, and in proportion to the step
    assert step_activation_bytes(args.replace(tp_size=2), qwen, 2) < reserved
    small = ServerArgs(chunked_prefill_size=2048, max_prefill_tokens=4096)
    assert step_activation_bytes(small, qwen, 2) * 16 == reserved
    moe = load_hf_config(str(CONFIGS / "qwen3-30b-a3b"))  # the routed experts' widths together
    assert step_activation_bytes(small, moe, 2) > 4096 * 3 * moe.num_experts_per_tok * moe.moe_intermediate_size * 2
