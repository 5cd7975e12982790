"""The fits section of scripts/bench_hicache.sh: a workload that the device pool holds whole, with the host tier and
without it (issue 27: throughput within 3%).

Both servers are up at once and `bench serve` runs against each in turn, `--rounds` times, the order alternating (the
tier first in odd rounds, second in even ones), so a loaded machine's drift and any first-or-second effect hit both
alike. Beside each run's wall-clock throughput it reads the CPU time (user + system, all threads: /proc/PID/stat) of
each of the server's processes over the run, per output token: the two servers do the same steps (the same requests,
the same cache hits: nothing is evicted), so the tier's own work shows as CPU time, which other processes on the
machine distort far less than they do wall time. Prints each round's ratios (tier / no tier) and their medians, and
writes them to OUT/NAME.json.

    python3 scripts/bench_hicache_fits.py --out OUT --name NAME --rounds N --server-flags="..." \
        --tier-flags="--enable-hierarchical-cache ..." --bench-flags="--dataset multi-turn ..."
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


def run_bench(server: ServerProcess, label: str, out: Path, name: str, bench_flags: list[str]) -> dict:
    """One `bench serve` run against `server`: its metrics, with the CPU time its processes spent meanwhile."""
    before = cpu_seconds(server.proc.pid)
    cmd = [sys.executable, "-m", "radixserve.bench", "serve", "--base-url", server.url, "--label", label,
           "--no-plot", "--output-dir", str(out), "--output-name", name, *bench_flags]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    after = cpu_seconds(server.proc.pid)
    metrics = json.loads((out / f"{name}.json").read_text())["runs"][0]["metrics"]
    cpu = {k: after[k] - before.get(k, 0.0) for k in after}
    return {"total_throughput": metrics["total_throughput"], "output_tokens": metrics["output_tokens"],
            "cached_tokens": metrics["cached_tokens"], "cpu_s": cpu, "cpu_s_total": sum(cpu.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server-flags", default="", help="both servers' flags")
    ap.add_argument("--tier-flags", required=True, help="the tier's server's flags beside them")
    ap.add_argument("--bench-flags", required=True, help="`bench serve`'s workload flags")
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(ns.out)  # the servers' logs go there
    servers = {"hicache": ServerProcess(ns.server_flags.split() + ns.tier_flags.split(), f"{ns.name}-server-hicache"),
               "no-hicache": ServerProcess(ns.server_flags.split(), f"{ns.name}-server-none")}
    rounds = []
    try:
        for s in servers.values():
            s.wait_ready(START_TIMEOUT_S)
        for r in range(1, ns.rounds + 1):
            order = ["hicache", "no-hicache"] if r % 2 else ["no-hicache", "hicache"]
            runs = {label: run_bench(servers[label], label, ns.out, f"{ns.name}-{r}-{label}", ns.bench_flags.split())
                    for label in order}
            tier, none = runs["hicache"], runs["no-hicache"]
            rnd = {"round": r, "order": order, "runs": runs,
                   "throughput_ratio": tier["total_throughput"] / none["total_throughput"],
                   "cpu_ratio": tier["cpu_s_total"] / none["cpu_s_total"],
                   "worker_cpu_ratio": _ratio(tier, none, "worker"), "scheduler_cpu_ratio": _ratio(tier, none,
                                                                                                 "scheduler")}
            rounds.append(rnd)
            per_token = {k: 1e3 * v["cpu_s_total"] / max(1, v["output_tokens"]) for k, v in runs.items()}
            print(f"round {r} ({' then '.join(order)}): total throughput tier / no tier x{rnd['throughput_ratio']:.3f}"
                  f" ({tier['total_throughput']:.0f} / {none['total_throughput']:.0f} tok/s); CPU ms per output token "
                  f"{per_token['hicache']:.1f} / {per_token['no-hicache']:.1f} (x{rnd['cpu_ratio']:.3f}); CPU s worker "
                  f"{_cpu(tier, 'worker'):.2f} / {_cpu(none, 'worker'):.2f}, scheduler {_cpu(tier, 'scheduler'):.2f} / "
                  f"{_cpu(none, 'scheduler'):.2f}", flush=True)
    finally:
        for s in servers.values():
            s.terminate(20)
    summary = {key: statistics.median(r[key] for r in rounds)
               for key in ("throughput_ratio", "cpu_ratio", "worker_cpu_ratio", "scheduler_cpu_ratio")}
    (ns.out / f"{ns.name}.json").write_text(json.dumps({"median": summary, "rounds": rounds,
                                                        "load_avg_end": os.getloadavg()}, indent=1))
    print(f"tier / no tier over {len(rounds)} rounds, medians: total throughput x{summary['throughput_ratio']:.3f}; "
          f"CPU time of the server's processes x{summary['cpu_ratio']:.3f} (worker x{summary['worker_cpu_ratio']:.3f},"
          f" scheduler x{summary['scheduler_cpu_ratio']:.3f})")


def _cpu(run: dict, prefix: str) -> float:
    """CPU seconds of a run's processes whose names start with `prefix` (every TP rank's `worker-N`)."""
    return sum(v for k, v in run["cpu_s"].items() if k.startswith(prefix))


def _ratio(tier: dict, none: dict, prefix: str) -> float:
    return _cpu(tier, prefix) / max(_cpu(none, prefix), 1e-9)


if __name__ == "__main__":
    main()
