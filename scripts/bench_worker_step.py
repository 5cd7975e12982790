"""One worker's decode step alone (ModelRunner.launch on synthetic batches, no scheduler), on CPU or GPU:
    python scripts/bench_worker_step.py [--model-path DIR] [--dtype D] [--quantization Q] [--batch-sizes 1 16]
        [--context 100] [--profile BS]
Prints the best of three runs of --steps steps per batch size; --profile prints torch.profiler's operator table
for one batch size. Set OMP_WAIT_POLICY / GOMP_SPINCOUNT in the environment to compare OpenMP settings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from gpu_check import Synth  # noqa: E402

from radixserve.config import ServerArgs  # noqa: E402
from radixserve.model_files import resolve_model  # noqa: E402
from worker_proc.model_runner import ModelRunner  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None, help="as the server's flag (docs/quantization.md)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile", type=int, default=None, metavar="BS")
    p.add_argument("--max-total-tokens", type=int, default=20000,
                   help="KV pool in tokens (0: sized as a server sizes it)")
    ns = p.parse_args()
    model_dir = resolve_model(ns.model_path)
    runner = ModelRunner(ServerArgs(model_path=model_dir, dtype=ns.dtype, quantization=ns.quantization,
                                    max_total_tokens=ns.max_total_tokens or None), 0, model_dir)
    print(f"{model_dir}: {runner.dtype} on {runner.device}, {torch.get_num_threads()} threads")
    synth = Synth(runner)
    for bs in ns.batch_sizes:
        best = min(synth.decode_loop(bs, ns.context, ns.steps) for _ in range(3))
        print(f"batch {bs:4d}, context {ns.context}: {best * 1e3:.1f} ms/step ({bs / best:.1f} tok/s)")
    if ns.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            synth.decode_loop(ns.profile, ns.context, 5, warmup=1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
