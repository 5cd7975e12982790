"""--dtype auto on a CPU: bfloat16 weights and KV where the CPU computes bf16 natively, float32 elsewhere."""

from __future__ import annotations

import pytest

from radixserve import Engine
from worker_proc.model_runner import cpu_has_native_bf16

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_auto_dtype_follows_the_cpu() -> None:
    flags = open("/proc/cpuinfo").read().split()
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (auto stays float32 here)")
def test_default_serves_in_bf16_and_answers() -> None:
    """The default engine runs in bf16 on this CPU and still answers correctly; float32 stays available by flag."""
    greedy = {"temperature": 0, "max_new_tokens": 8}
    with Engine(max_total_tokens=1024, max_running_requests=4) as eng:
        assert eng.runtime.dtype == "bfloat16"
        bf16 = eng.generate(QUESTION, greedy)
        eng.check_invariants()
    assert "Paris" in bf16["text"]
    with Engine(max_total_tokens=1024, max_running_requests=4, dtype="float32") as eng:
        assert eng.runtime.dtype == "float32"
        assert "Paris" in eng.generate(QUESTION, greedy)["text"]
