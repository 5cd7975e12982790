"""--dtype auto on a CPU: bfloat16 weights and KV where the CPU computes bf16 natively, float32 elsewhere."""

from __future__ import annotations

import os

import pytest

from radixserve import Engine
from radixserve.launch.supervisor import short_spin_env
from worker_proc.runtime_facts import cpu_has_native_bf16

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_auto_dtype_follows_the_cpu() -> None:
    flags = open("/proc/cpuinfo").read().split()
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (auto stays float32 here)")
def test_auto_dtype_serves_in_bf16_and_answers() -> None:
    """--dtype auto runs in bf16 on this CPU and still answers correctly (every other test server runs in float32
    by flag), with the bundled GGUF file expanded to bf16 by --quantization none (without the flag its blocks are
    kept where the CPU runs them: tests/test_cpu_quant.py)."""
    with Engine(max_total_tokens=1024, max_running_requests=4, quantization="none") as eng:
        assert (eng.runtime.dtype, eng.runtime.weight_dtype) == ("bfloat16", "bfloat16")
        assert "Paris" in eng.generate(QUESTION, {"temperature": 0, "max_new_tokens": 8})["text"]
        eng.check_invariants()


@pytest.mark.parametrize("given", [{}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}])
def test_a_named_wait_policy_or_spin_count_is_kept(monkeypatch, given: dict[str, str]) -> None:
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    assert short_spin_env() == ({} if given else {"GOMP_SPINCOUNT": "3000"})


def test_cpu_worker_spins_briefly_unless_told(monkeypatch, capfd) -> None:
    """The worker starts with GOMP_SPINCOUNT=3000 (a short OpenMP spin, docs/deploy.md) where the environment
    names no wait policy or spin count (else it keeps those: the test above); the launching process' environment
    is untouched."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    with Engine(max_total_tokens=1024, max_running_requests=4, dtype="float32", log_level="info"):
        pass
    assert "OpenMP waits: GOMP_SPINCOUNT=3000\n" in capfd.readouterr().err
    assert not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys()
