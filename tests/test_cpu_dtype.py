"""--dtype auto on a CPU: bfloat16 weights and KV where the CPU computes bf16 natively, float32 elsewhere."""

from __future__ import annotations

import os

import pytest

from radixserve import Engine
from worker_proc.runtime_facts import cpu_has_native_bf16

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


@pytest.mark.parametrize("given", [{}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}])
def test_cpu_worker_spins_briefly_unless_told(monkeypatch, capfd, given: dict[str, str]) -> None:
    """The worker starts with GOMP_SPINCOUNT=3000 (a short OpenMP spin, docs/deploy.md) unless the environment
    names a wait policy or a spin count, which it then keeps; the launching process' environment is untouched."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    with Engine(max_total_tokens=1024, max_running_requests=4, dtype="float32", log_level="info"):
        pass
    expected = " ".join(f"{k}={v}" for k, v in given.items()) or "GOMP_SPINCOUNT=3000"
    assert f"OpenMP waits: {expected}\n" in capfd.readouterr().err
    assert {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ} == given
