"""The CPU's linear kernels side by side: bf16 (cpu_kernels.PackedLinear) vs the quantized forms of
worker_proc.cpu_quant (int8 per channel, GGUF Q4_1 and Q8_0 blocks), on 30 different weights of the default
model's gate_up shape (3072 x 576, so the weights do not stay in cache), one thread, process CPU time (less
sensitive to a shared machine's load than wall time), the best of 5 per batch size:
    python scripts/bench_cpu_quant_linear.py [--rows 1 4 16 128] [--threads N] [--against OLD.c]
--against: each form also through the library built from another version of worker_proc/cpu_kernels.c (say
`git show REV:worker_proc/cpu_kernels.c > OLD.c`; the same packed layouts), the two builds timed in turn on the same
weights in one process, so that a shared machine's changing load falls on both alike; prints each ratio.
--threads N: OpenMP threads (timed by wall time then)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
import torch  # noqa: E402

from worker_proc import cpu_kernels  # noqa: E402
from worker_proc.cpu_kernels import PackedLinear  # noqa: E402
from worker_proc.cpu_quant import QuantLinear, gguf_weight, quantize_int8  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--against", type=Path, default=None, metavar="OLD.c")
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    clock = time.process_time if ns.threads == 1 else time.perf_counter
    builds = {"": cpu_kernels.library()}
    if ns.against is not None:
        builds = {"new ": builds[""], "old ": cpu_kernels.build(ns.against)}
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(3072, 576, generator=g) * 0.05 for _ in range(30)]
    forms = {"bf16": [PackedLinear(w.bfloat16()) for w in weights],
             "int8": [QuantLinear(quantize_int8(w)) for w in weights]}
    for kind in ("Q4_1", "Q8_0"):
        qtype = gguf.GGMLQuantizationType[kind]
        forms[kind] = [QuantLinear(gguf_weight(gguf.quants.quantize(w.numpy(), qtype), kind)) for w in weights]
    for rows in ns.rows:
        x = torch.randn(rows, 576, generator=g).bfloat16()
        best = {}
        for round_ in range(5 if ns.against is None else 16):
            for name, layers in forms.items():
                for tag, lib in list(builds.items())[::1 if round_ % 2 else -1]:  # the order alternates
                    for layer in layers:
                        layer.lib = lib
                    t0 = clock()
                    for layer in layers:
                        layer(x, None)
                    best[name, tag] = min(best.get((name, tag), 1e9), (clock() - t0) / len(layers) * 1e6)
        cells = []
        for name in forms:
            cells.append(name + " " + " ".join(f"{tag}{best[name, tag]:.0f} us" for tag in builds)
                         + (f" ({best[name, 'old '] / best[name, 'new ']:.2f}x)" if ns.against else ""))
        print(f"rows {rows:4d}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
