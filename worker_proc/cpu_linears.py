"""Which kernel runs a CPU model's bfloat16 linears: cpu_kernels' AVX512-BF16 kernel or oneDNN's matmul (AMX tiles on
CPUs that have them), chosen per weight shape at start by timing both on that weight.

Without AMX the AVX512-BF16 kernel beat oneDNN's blocked layout at every row count measured (docs/quantization.md),
so only CPUs with AMX-BF16 time them (`Chooser`): there oneDNN's tiles can win from some batch size up while a
batch of a row or a few stays a weight read that the AVX512 kernel does with less overhead. A shape on which oneDNN
wins from R rows keeps both layouts (`SplitLinear`: the weight's bytes twice) and runs steps of R rows or more
through oneDNN; from the first row step, only oneDNN's layout is kept. --enable-deterministic-inference never splits:
a row's bits would then depend on the batch it came in (batch_invariant keeps the AVX512 kernel's fixed order).
"""

from __future__ import annotations

import time

import torch

from worker_proc.cpu_kernels import PackedLinear

ROW_STEPS = (1, 4, 16, 64, 256)  # the batch sizes timed; a split is made at one of them
MARGIN = 1.1  # oneDNN is kept only where it is this much faster (where both are kept, its copy costs memory)
MEASURE_S = 0.02  # wall time each (kernel, row step) is timed for, at least three calls


class OneDnnLinear:
    """A bf16 weight in oneDNN's blocked layout: bit for bit F.linear, faster at small batches."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.n, self.k = weight.shape
        self.data = torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.data, bias, "none", [], "")


class SplitLinear:
    """Below `from_rows` rows of x the AVX512-BF16 kernel (its layout also describes the weight to the decoder
    stack, which runs only steps of fewer rows: cpu_stack.stack_for), from there oneDNN's."""

    def __init__(self, native: PackedLinear, onednn: OneDnnLinear, from_rows: int) -> None:
        self.native, self.onednn, self.from_rows = native, onednn, from_rows
        self.n, self.k = native.n, native.k

    def stack_fields(self) -> tuple[torch.Tensor, None, None, int, int, bool]:
        return self.native.stack_fields()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return (self.onednn if rows >= self.from_rows else self.native)(x, bias)


def seconds_per_call(linear, x: torch.Tensor) -> float:
    """The least of a few timed runs of linear(x), after one untimed call."""
    linear(x, None)
    t0 = time.perf_counter()
    linear(x, None)
    once = time.perf_counter() - t0
    calls = max(3, min(50, int(MEASURE_S / max(once, 1e-6))))
    best = once
    for _ in range(calls):
        t0 = time.perf_counter()
        linear(x, None)
        best = min(best, time.perf_counter() - t0)
    return best


def onednn_from(native: PackedLinear, onednn: OneDnnLinear) -> int | None:
    """The least of ROW_STEPS from which oneDNN is MARGIN times faster than the AVX512 kernel at every step, or None."""
    gen = torch.Generator().manual_seed(0)
    split = None
    for rows in reversed(ROW_STEPS):
        x = torch.randn(rows, native.k, generator=gen).to(torch.bfloat16)
        if seconds_per_call(onednn, x) * MARGIN > seconds_per_call(native, x):
            break
        split = rows
    return split


class Chooser:
    """Packs each bf16 weight in the form that its shape's timing chose (`onednn_from`, once per shape; `splits`:
    the choices already made, shape (n, k) -> the row step oneDNN runs from, or None)."""

    def __init__(self, splits: dict[tuple[int, int], int | None] | None = None) -> None:
        self.splits = dict(splits or {})

    def __call__(self, weight: torch.Tensor) -> PackedLinear | OneDnnLinear | SplitLinear:
        native, onednn, shape = PackedLinear(weight), None, tuple(weight.shape)
        if shape not in self.splits:
            onednn = OneDnnLinear(weight)
            self.splits[shape] = onednn_from(native, onednn)
        split = self.splits[shape]
        if split is None:
            return native
        onednn = onednn or OneDnnLinear(weight)
        return onednn if split == ROW_STEPS[0] else SplitLinear(native, onednn, split)

    def summary(self) -> str:
        """Where oneDNN runs, per weight shape (n x k)."""
        parts = [f"{n}x{k} " + ("always" if rows == ROW_STEPS[0] else f"from {rows} rows")
                 for (n, k), rows in self.splits.items() if rows is not None]
        timed = ", ".join(f"{n}x{k}" for n, k in self.splits)
        return f"oneDNN (AMX) timed against it on {timed}: " + ("; ".join(parts) if parts else "nowhere faster")
