"""The CPU decoder stack in one call (worker_proc/cpu_stack.py) gives bit for bit the logits of the same model run
layer by layer through the same kernels: bf16 packed weights and the quantized forms, prefill and decode."""

from __future__ import annotations

import pytest
import torch
from model_harness import greedy
from test_cpu_quant import quant_weight
from test_models import prompts, random_hf_model, tiny_config

from radixserve.model_files import load_hf_config
from worker_proc import cpu_kernels, cpu_stack
from worker_proc.cpu_quant import install_quantized, linear_layers
from worker_proc.layers import ParallelLMHead, pack_cpu_linears
from worker_proc.weights import load_model


@pytest.mark.skipif(cpu_kernels.library() is None, reason="cpu_kernels needs AVX512-BF16 and a C compiler")
@pytest.mark.parametrize("form", ["bf16", "int8", "Q4_1"])
def test_stack_equals_layer_by_layer(tmp_path, monkeypatch, form):
    """A tiny random Llama (biases, a tied LM head): a prefill of 3 prompts and 3 decode steps."""
    random_hf_model(tiny_config("llama"), 0, tmp_path)
    model = load_model(str(tmp_path), load_hf_config(str(tmp_path)), "auto", torch.bfloat16, "cpu")
    if form == "bf16":
        pack_cpu_linears(model)
    else:
        install_quantized(model, {name: quant_weight(m.weight, "Q8_0" if form == "Q4_1" and
                                                     isinstance(m, ParallelLMHead) else form)
                                  for name, m in linear_layers(model).items()})
    calls = []
    stack_for = cpu_stack.stack_for
    monkeypatch.setattr(cpu_stack, "stack_for", lambda *a: calls.append(stack_for(*a)) or calls[-1])
    got_logits, got = greedy(model, prompts(3), 3)
    assert len(calls) == 4 and all(calls)  # every step ran the stack
    monkeypatch.setattr(cpu_stack, "stack_for", lambda *a: None)
    want_logits, want = greedy(model, prompts(3), 3)
    assert got == want and torch.equal(got_logits, want_logits)
