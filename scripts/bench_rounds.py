"""Servers compared side by side on a noisy machine: all of them up at once, and `bench serve` run against each in
turn, `--rounds` times, the order rotating each round (so a loaded machine's drift and any first-or-last effect hit
them all alike). Beside each run's wall-clock throughput it reads the CPU time (user + system, all threads:
/proc/PID/stat) of each of the server's processes over the run, per output token: servers doing the same work show
their differences as CPU time, which other processes on the machine distort far less than they do wall time. Prints
each round's ratios to the first server (per point of the bench: each --max-concurrency, each rate) and their
medians, and writes them to OUT/NAME.json.

    python3 scripts/bench_rounds.py --out OUT --name NAME --rounds N --common-flags="..." \
        --server hicache="--enable-hierarchical-cache ..." --server no-hicache="" --bench-flags="--dataset ..."

Used by scripts/bench_hicache.sh (fits: the host tier against none) and scripts/bench_cpu.sh (rounds: the weight
formats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radixserve.bench.server_process import ServerProcess, descendants  # noqa: E402

START_TIMEOUT_S = 900.0
TICKS = os.sysconf("SC_CLK_TCK")
RATIOS = ("output_throughput", "total_throughput", "cpu_per_token", "worker_cpu", "scheduler_cpu")


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of each process of the server launched as `pid`, by process name (the
    launcher, which serves HTTP, is `python`)."""
    out: dict[str, float] = {}
    for p in [pid, *descendants(pid)]:
        try:
            text = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return out


def run_bench(server: ServerProcess, label: str, out: Path, name: str, bench_flags: list[str]) -> list[dict]:
    """One `bench serve` run against `server`: each of its points' metrics, with the CPU time the server's processes
    spent over the whole run (shared out by output tokens where the run has several points)."""
    before = cpu_seconds(server.proc.pid)
    cmd = [sys.executable, "-m", "radixserve.bench", "serve", "--base-url", server.url, "--label", label,
           "--no-plot", "--output-dir", str(out), "--output-name", name, *bench_flags]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    after = cpu_seconds(server.proc.pid)
    cpu = {k: after[k] - before.get(k, 0.0) for k in after}
    points = [r["metrics"] for r in json.loads((out / f"{name}.json").read_text())["runs"]]
    tokens = sum(m["output_tokens"] for m in points)
    return [{"output_throughput": m["output_throughput"], "total_throughput": m["total_throughput"],
             "output_tokens": m["output_tokens"], "cached_tokens": m["cached_tokens"],
             "cpu_per_token": sum(cpu.values()) / tokens, "worker_cpu": _cpu(cpu, "worker") / tokens,
             "scheduler_cpu": _cpu(cpu, "scheduler") / tokens, "cpu_s": cpu} for m in points]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--common-flags", default="", help="every server's flags")
    ap.add_argument("--server", action="append", required=True, metavar='LABEL="FLAGS"',
                    help="a server: its label and its flags beside the common ones (the first is the reference)")
    ap.add_argument("--bench-flags", required=True, help="`bench serve`'s workload flags")
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(ns.out)  # the servers' logs go there
    flags = dict(s.split("=", 1) for s in ns.server)
    labels = list(flags)
    servers = {label: ServerProcess(ns.common_flags.split() + flags[label].split(), f"{ns.name}-server-{label}")
               for label in labels}
    rounds = []
    try:
        for s in servers.values():
            s.wait_ready(START_TIMEOUT_S)
        for r in range(ns.rounds):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            runs = {label: run_bench(servers[label], label, ns.out, f"{ns.name}-{r + 1}-{label}",
                                     ns.bench_flags.split()) for label in order}
            ratios = {label: [{k: p[k] / ref[k] for k in RATIOS} for p, ref in zip(runs[label], runs[labels[0]])]
                      for label in labels[1:]}
            rounds.append({"round": r + 1, "order": order, "runs": runs, "ratios": ratios})
            for label, points in ratios.items():
                print(f"round {r + 1} ({' then '.join(order)}), {label} / {labels[0]}: {_describe(points)}; output "
                      f"tok/s " + ", ".join(f"{a['output_throughput']:.1f} / {b['output_throughput']:.1f}"
                                            for a, b in zip(runs[label], runs[labels[0]])), flush=True)
    finally:
        for s in servers.values():
            s.terminate(20)
    medians = {label: [{k: statistics.median(rnd["ratios"][label][i][k] for rnd in rounds) for k in RATIOS}
                       for i in range(len(rounds[0]["ratios"][label]))] for label in labels[1:]} if rounds else {}
    (ns.out / f"{ns.name}.json").write_text(json.dumps({"median": medians, "rounds": rounds,
                                                        "load_avg_end": os.getloadavg()}, indent=1))
    for label, points in medians.items():
        print(f"{label} / {labels[0]} over {len(rounds)} rounds, medians: {_describe(points)}")


def _describe(points: list[dict]) -> str:
    return "; ".join(f"point {i + 1}: output tok/s x{p['output_throughput']:.3f}, total x{p['total_throughput']:.3f}, "
                     f"CPU time per output token x{p['cpu_per_token']:.3f} (worker x{p['worker_cpu']:.3f}, scheduler "
                     f"x{p['scheduler_cpu']:.3f})" for i, p in enumerate(points))


def _cpu(cpu: dict[str, float], prefix: str) -> float:
    """CPU seconds of the processes whose names start with `prefix` (every TP rank's `worker-N`)."""
    return sum(v for k, v in cpu.items() if k.startswith(prefix))


if __name__ == "__main__":
    main()
