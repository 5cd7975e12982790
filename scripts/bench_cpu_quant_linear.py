"""The CPU's linear kernels side by side: bf16 (cpu_kernels.PackedLinear) vs the quantized forms of
worker_proc.cpu_quant (int8 per channel, GGUF Q4_1 and Q8_0 blocks), on 30 different weights of the default
model's gate_up shape (3072 x 576, so the weights do not stay in cache), one thread, process CPU time (less
sensitive to a shared machine's load than wall time), the best of 5 per batch size:
    python scripts/bench_cpu_quant_linear.py [--rows 1 4 16 128]"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
import torch  # noqa: E402

from worker_proc.cpu_kernels import PackedLinear  # noqa: E402
from worker_proc.cpu_quant import QuantLinear, gguf_weight, quantize_int8  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128])
    ns = p.parse_args()
    torch.set_num_threads(1)
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
        for _ in range(5):
            for name, layers in forms.items():
                t0 = time.process_time()
                for layer in layers:
                    layer(x, None)
                best[name] = min(best.get(name, 1e9), (time.process_time() - t0) / len(layers) * 1e6)
        print(f"rows {rows:4d}: " + "  ".join(f"{name} {us:.0f} us" for name, us in best.items()), flush=True)


if __name__ == "__main__":
    main()
