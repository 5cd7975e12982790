"""The choice between cpu_kernels' AVX512-BF16 linear and oneDNN's per weight shape (worker_proc/cpu_linears.py, made
by timing on CPUs with AMX): each form gives its own kernel's bits, a split weight runs each step through the kernel
its row count picks, and the decoder stack runs only the steps below every split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_harness import greedy
from test_models import prompts, random_hf_model, tiny_config

from radixserve.model_files import load_hf_config
from worker_proc import cpu_kernels, cpu_linears, cpu_stack
from worker_proc.cpu_linears import Chooser, OneDnnLinear, SplitLinear
from worker_proc.cpu_quant import linear_layers
from worker_proc.layers import pack_cpu_linears
from worker_proc.weights import load_model

pytestmark = [
    pytest.mark.skipif(cpu_kernels.library() is None, reason="cpu_kernels needs AVX512-BF16 and a C compiler"),
    pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN without bf16 on this CPU"),
]


def test_split_linear_runs_each_row_count_through_its_kernel():
    w = (torch.randn(96, 64) * 0.1).bfloat16()
    bias = torch.randn(96).bfloat16()
    native, onednn = cpu_kernels.PackedLinear(w), OneDnnLinear(w)
    split = SplitLinear(native, onednn, from_rows=4)
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 64).bfloat16()
        want = (native if rows < 4 else onednn)(x, bias)
        assert torch.equal(split(x, bias), want), rows
        assert torch.allclose(want.float(), F.linear(x.float(), w.float(), bias.float()), atol=0.05, rtol=0.02)


def test_chooser_times_each_shape_once_and_packs_what_it_chose(tmp_path):
    """The real timing on this CPU: whatever it chose, each layer holds that form and the model still decodes."""
    random_hf_model(tiny_config("llama"), 0, tmp_path)
    model = load_model(str(tmp_path), load_hf_config(str(tmp_path)), "auto", torch.bfloat16, "cpu")
    shapes = {tuple(m.weight.shape) for m in linear_layers(model).values()}
    chooser = Chooser()
    _, layout = pack_cpu_linears(model, chooser=chooser)
    assert set(chooser.splits) == shapes and "oneDNN" in layout
    for m in linear_layers(model).values():
        rows = chooser.splits[(m.packed.n, m.packed.k)]
        kind = {None: cpu_kernels.PackedLinear, cpu_linears.ROW_STEPS[0]: OneDnnLinear}.get(rows, SplitLinear)
        assert type(m.packed) is kind and getattr(m.packed, "from_rows", rows) == rows
    _, tokens = greedy(model, prompts(2), 2)
    assert len(tokens) == 2 and all(len(t) == 3 for t in tokens)


def test_steps_from_a_split_run_layer_by_layer_and_below_it_the_stack(tmp_path, monkeypatch):
    """Every shape split at 4 rows: the 3-prompt prefill runs its linears through oneDNN outside the stack, the
    3-row decode steps through the stack; the logits stay those of the model packed for the AVX512 kernel alone,
    within bf16 rounding."""
    random_hf_model(tiny_config("llama"), 0, tmp_path)
    config = load_hf_config(str(tmp_path))
    split = load_model(str(tmp_path), config, "auto", torch.bfloat16, "cpu")
    pack_cpu_linears(split, chooser=Chooser({tuple(m.weight.shape): 4 for m in linear_layers(split).values()}))
    assert all(isinstance(m.packed, SplitLinear) for m in linear_layers(split).values())
    native = load_model(str(tmp_path), config, "auto", torch.bfloat16, "cpu")
    pack_cpu_linears(native)
    calls, onednn_rows = [], []
    stack_for, onednn_call = cpu_stack.stack_for, OneDnnLinear.__call__
    monkeypatch.setattr(cpu_stack, "stack_for", lambda *a: calls.append(stack_for(*a)) or calls[-1])
    monkeypatch.setattr(OneDnnLinear, "__call__",
                        lambda self, x, b: onednn_rows.append(len(x)) or onednn_call(self, x, b))
    got_logits, _ = greedy(split, prompts(3), 2)
    assert calls[0] is None and all(calls[1:]) and len(calls) == 3
    # the prefill's four linears a layer, none of the decodes'
    assert len(onednn_rows) == 4 * len(split.model.layers) and min(onednn_rows) >= 4
    want_logits, _ = greedy(native, prompts(3), 2)
    assert torch.allclose(got_logits.float(), want_logits.float(), atol=0.1, rtol=0.05)
