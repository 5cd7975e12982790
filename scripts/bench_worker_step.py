"""One worker's decode step alone (ModelRunner.launch on synthetic batches, no scheduler), on CPU or GPU:
    python scripts/bench_worker_step.py [--model-path DIR] [--dtype D] [--quantization none gguf int8]
        [--batch-sizes 1 16] [--context 100] [--prefill 64] [--rounds 5] [--profile BS] [--cpu-time] [--against OLD.c]
With several --quantization forms (`none`: the model's dtype, a GGUF file expanded) each gets its own runner in this
process and the forms are timed in turn, round after round, so that a shared machine's changing load falls on all of
them alike; each figure is the best round's median step (the spread: the rounds' median and worst). --prefill N
also times a prefill of N new tokens of one request. --profile prints torch.profiler's operator table for one batch
size of the first form. --cpu-time (CPU only): one thread, timed by the process's CPU time, which other work on a
shared machine disturbs far less than wall time (it time-slices a parallel step). Set OMP_WAIT_POLICY /
GOMP_SPINCOUNT in the environment to compare OpenMP settings. --against OLD.c (CPU): every case also runs on the
library built from another version of worker_proc/cpu_kernels.c (`git show REV:worker_proc/cpu_kernels.c > OLD.c`;
the same packed layouts and every kernel the runs call), swapped in for the same runners between timings, the
order alternating round by round; prints the old / new ratio of each round's time and their median."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from gpu_check import Synth  # noqa: E402

from radixserve.config import ServerArgs  # noqa: E402
from radixserve.model_files import resolve_model  # noqa: E402
from worker_proc import cpu_kernels  # noqa: E402
from worker_proc.model_runner import ModelRunner  # noqa: E402


def prefill_time(synth: Synth, tokens: int, clock) -> float:
    """Seconds of one step that prefills `tokens` new tokens of one request (no cached prefix)."""
    new = synth.new_req(0, synth.np.zeros(0, synth.np.int32))
    t0 = clock()
    synth.runner.launch(synth.batch(False, [0], [0], [tokens], [new])).result()
    return clock() - t0


def use_library(lib, runners) -> None:
    """Run every CPU kernel call of these runners through `lib` (a cpu_kernels build): the module's handle and
    each packed layer's own."""
    cpu_kernels.library = lambda: lib
    for runner in runners:
        for module in runner.model.modules():
            if getattr(getattr(module, "packed", None), "lib", None) is not None:
                module.packed.lib = lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", nargs="+", default=["none"], help="as the server's flag (docs/quantization.md); "
                   "several: side by side")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prefill", type=int, default=0, metavar="N")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", type=int, default=None, metavar="BS")
    p.add_argument("--cpu-time", action="store_true", help="one thread, timed by process CPU time (CPU only)")
    p.add_argument("--max-total-tokens", type=int, default=20000,
                   help="KV pool in tokens (0: sized as a server sizes it)")
    p.add_argument("--against", type=Path, default=None, metavar="OLD.c")
    ns = p.parse_args()
    builds = {"": cpu_kernels.library()}
    if ns.against is not None:
        builds = {"new": builds[""], "old": cpu_kernels.build(ns.against)}
    model_dir = resolve_model(ns.model_path)
    clock = time.process_time if ns.cpu_time else time.perf_counter
    if ns.cpu_time:
        torch.set_num_threads(1)
    synths = {}
    for form in ns.quantization:
        runner = ModelRunner(ServerArgs(model_path=model_dir, dtype=ns.dtype,
                                        quantization=form,
                                        max_total_tokens=ns.max_total_tokens or None), 0, model_dir)
        print(f"{model_dir} ({form}): {runner.dtype} on {runner.device}, {torch.get_num_threads()} threads")
        synths[form] = Synth(runner)
    cases = [f"batch {bs}" for bs in ns.batch_sizes] + ([f"prefill {ns.prefill}"] if ns.prefill else [])
    times: dict[tuple[str, str, str], list[float]] = {}
    runners = [synth.runner for synth in synths.values()]
    for round_ in range(ns.rounds):
        for case in cases:
            for form, synth in synths.items():
                for tag, lib in list(builds.items())[::1 if round_ % 2 else -1]:
                    if ns.against is not None:
                        use_library(lib, runners)
                    kind, n = case.split()
                    t = synth.decode_loop(int(n), ns.context, ns.steps, clock=clock) if kind == "batch" else \
                        statistics.median(prefill_time(synth, int(n), clock) for _ in range(5))
                    times.setdefault((case, form, tag), []).append(t)
    for case in cases:
        first = min(times[(case, ns.quantization[0], next(iter(builds)))])
        for form in ns.quantization:
            for tag in builds:
                run = times[(case, form, tag)]
                best = min(run)
                per_s = f" ({int(case.split()[1]) / best:.1f} tok/s)" if case.startswith("batch") else ""
                print(f"{case:>12}, context {ns.context}, {form:>5}{' ' + tag if tag else ''}: {best * 1e3:6.2f} "
                      f"ms/step{per_s}, rounds' median {statistics.median(run) * 1e3:.2f}, worst "
                      f"{max(run) * 1e3:.2f}; {first / best:.2f}x {ns.quantization[0]}")
            if ns.against is not None:
                ratios = sorted(o / n for o, n in zip(times[(case, form, "old")], times[(case, form, "new")]))
                print(f"{case:>12}, context {ns.context}, {form:>5}: old / new per round, median "
                      f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})")
    if ns.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            synths[ns.quantization[0]].decode_loop(ns.profile, ns.context, 5, warmup=1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
