"""The bench's output: the report dict (settings, machine, runs, ratios), its JSON and PNG, tables, progress bars.

A run is `{"label", "max_concurrency", "request_rate", "metrics": summarize(...)}` (serve, offline) or a
one-batch point; baselines are runs with another label, compared with the main label's run at the same point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from radixserve.bench.metrics import RequestResult, summarize

POINT_KEYS = ("max_concurrency", "request_rate")
RATIO_KEYS = ("output_throughput", "total_throughput", "request_throughput")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--output-dir", default="bench_out", help="where the JSON and PNG go")
    g.add_argument("--output-name", help="file name stem (default: MODE-DATASET-TIME)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    g.add_argument("--label", default="radixserve", help="name of the measured system in the report")


def new_report(mode: str, ns: argparse.Namespace) -> dict[str, Any]:
    return {"mode": mode, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": _git_commit(), "command": shlex.join(["python", *sys.orig_argv[1:]]),
            "machine": machine_info(), "settings": {k: _json_safe(v) for k, v in vars(ns).items()},
            "main_label": ns.label, "runs": []}


def dtypes(runtime: dict[str, Any] | None) -> str | None:
    """A run's weight and KV dtypes, from the workers' RuntimeInfo (None where the server did not say)."""
    if not runtime or "dtype" not in runtime:
        return None
    return (f"weights {runtime.get('weight_dtype') or runtime['dtype']}, "
            f"KV {runtime.get('kv_cache_dtype') or runtime['dtype']}")


def record(label: str, results: list[RequestResult], duration: float, runtime: dict[str, Any] | None = None,
           **point: Any) -> dict[str, Any]:
    """One serve / offline run: its point (concurrency, rate), the weight and KV dtypes of what served it
    (`runtime`: its RuntimeInfo), figures, and TTFTs for the plot."""
    run = {"label": label, **{k: point.get(k) for k in POINT_KEYS}, "dtypes": dtypes(runtime),
           "metrics": summarize(results, duration)}
    ttfts = [r.ttft * 1e3 for r in results if r.error is None and r.ttft is not None]
    if ttfts:
        run["ttft_ms_values"] = ttfts
    return run


def _json_safe(value: Any) -> Any:
    """inf (an unbounded request rate) as the string "inf": JSON has no infinity."""
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "load_avg_start": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _git_commit() -> str | None:
    """$GIT_COMMIT if set (a copied tree whose git metadata may lag, as on a lent GPU machine), else the
    checkout's commit, with "-dirty" when tracked files differ from it."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    return out.stdout.strip() or None


def point_of(run: dict[str, Any]) -> tuple:
    return tuple(run.get(k) for k in POINT_KEYS)


def ratios(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The main label's figures over each baseline run's, at the same point."""
    main = {point_of(r): r for r in report["runs"] if r["label"] == report["main_label"] and "metrics" in r}
    out = []
    for r in report["runs"]:
        m = main.get(point_of(r))
        if r["label"] == report["main_label"] or m is None or "metrics" not in r:
            continue
        entry = {"baseline": r["label"], **{k: r.get(k) for k in POINT_KEYS}}
        for key in RATIO_KEYS:
            base = r["metrics"][key]
            entry[key] = m["metrics"][key] / base if base else None
        late, base_late = m["metrics"].get("ttft_ms_late_turns"), r["metrics"].get("ttft_ms_late_turns")
        if late and base_late:  # how many times lower the main run's TTFT p50 of turn 3 on is
            entry["ttft_late_turns_p50_speedup"] = base_late["p50"] / late["p50"]
        out.append(entry)
    sweep = [q for q in out if q["baseline"].startswith("hf-bs")]
    if len(sweep) > 1:  # against HF's best batch size: the smallest ratio
        out.append(min(sweep, key=lambda q: q["output_throughput"] or math.inf) | {"best_of": "hf-bs*"})
    return out


def finish(report: dict[str, Any], ns: argparse.Namespace) -> Path:
    """Add ratios and the end load average, write JSON (and PNG unless --no-plot); returns the JSON path."""
    report["machine"]["load_avg_end"] = list(os.getloadavg())
    if report["mode"] != "one-batch":
        report["ratios"] = ratios(report)
    out_dir = Path(ns.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ns.output_name or f"{report['mode']}-{getattr(ns, 'dataset', 'static')}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = out_dir / f"{stem}.json"
    if not ns.no_plot:
        report["plot"] = str(out_dir / f"{stem}.png")
        save_plot(report, Path(report["plot"]))
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}" + (f" and {report['plot']}" if "plot" in report else ""))
    return path


# ---------------------------------------------------------------- text output

def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def print_runs(report: dict[str, Any]) -> None:
    """The serve / offline runs and the ratios to the baselines."""
    header = ["run", "conc", "rate", "req/s", "in tok/s", "out tok/s", "tot tok/s", "hit", "TTFT p50", "TTFT p99",
              "ITL p50", "TPOT p50", "E2E p50"]
    rows = []
    for r in report["runs"]:
        m = r["metrics"]
        rows.append([r["label"], r.get("max_concurrency"), r.get("request_rate"), m["request_throughput"],
                     m["input_throughput"], m["output_throughput"], m["total_throughput"], m["cache_hit_rate"],
                     *(m.get(k, {}).get(p) for k, p in (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("itl_ms", "p50"),
                                                          ("tpot_ms", "p50"), ("e2e_latency_ms", "p50")))])
    print(table(header, rows))
    print("(throughputs in requests or tokens per second; latencies in ms; hit = cached / prompt tokens)")
    for label, kinds in {r["label"]: r["dtypes"] for r in report["runs"] if r.get("dtypes")}.items():
        print(f"{label}: {kinds}")
    for r in report["runs"]:
        if "spec_accept_length" in r["metrics"]:
            length = r["metrics"]["spec_accept_length"]
            print(f"{_run_name(r)}: mean accepted length {length:.2f} tokens per verify step")
    for r in report["runs"]:
        if "router_loads" in r:  # smg: a load report per worker; sglang-router: a number per worker
            loads = r["router_loads"]
            print(f"{_run_name(r)}: the router's GET /get_loads at its busiest: " + "; ".join(
                [f"{w['worker']}: {w.get('num_running_reqs')} running, {w.get('num_waiting_reqs')} waiting, "
                 f"{w.get('num_used_tokens')} tokens used" for w in loads.get("loads", [])]
                + [f"{w['worker']}: {w['load']}" for w in loads.get("workers", [])]))
    for r in report["runs"]:
        by_turn = r["metrics"].get("ttft_ms_by_turn")
        if by_turn:
            print(f"TTFT by turn, {_run_name(r)} (last turn / first: p50 x{by_turn[-1]['p50'] / by_turn[0]['p50']:.2f},"
                  f" mean x{by_turn[-1]['mean'] / by_turn[0]['mean']:.2f}):")
            print(table(["turn", "requests", "prompt", "cached", "TTFT mean", "p50", "p90", "p99"],
                        [[t["turn"], t["requests"], t["prompt_tokens"], t["cached_tokens"], t["mean"], t["p50"],
                          t["p90"], t["p99"]] for t in by_turn]))
    for q in report.get("ratios") or ratios(report):
        at = ", ".join(f"{k}={q[k]}" for k in POINT_KEYS if q[k] is not None)
        best = " (HF's best batch size)" if q.get("best_of") else ""
        print(f"{report['main_label']} / {q['baseline']}{best}{f' ({at})' if at else ''}: "
              + ", ".join(f"{k} x{q[k]:.2f}" for k in RATIO_KEYS if q[k] is not None)
              + (f"; TTFT p50 of turn 3 on x{q['ttft_late_turns_p50_speedup']:.2f} lower"
                 if "ttft_late_turns_p50_speedup" in q else ""))


def progress(total: int, desc: str, unit: str = "req") -> tqdm:
    """A progress bar on stderr, drawn only where stderr is a terminal (tqdm's `disable=None`) and for more than
    one step."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None if total > 1 else True)


# ---------------------------------------------------------------- PNG

def save_plot(report: dict[str, Any], path: Path) -> None:
    """One PNG: throughput vs concurrency, TTFT distribution, throughput by run (radix on / off, HF);
    for one-batch, measured latency beside its floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _one_batch_panels(report) if report["mode"] == "one-batch" else _run_panels(report)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, draw in zip(axes[0], panels, strict=True):
        draw(ax)
    fig.suptitle(f"radixserve bench {report['mode']} ({report['date'][:10]}, {report.get('commit') or '?'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_panels(report: dict[str, Any]) -> list:
    runs = report["runs"]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    main = report["main_label"]
    swept = next((k for k in POINT_KEYS if len({r.get(k) for r in runs}) > 1), None)

    def by_point(ax: Any) -> None:
        for label in labels:
            pts = sorted((r[swept], r["metrics"]["output_throughput"]) for r in runs
                         if r["label"] == label and r.get(swept) is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(xlabel=swept.replace("_", " "), ylabel="output tokens / s", title="throughput vs concurrency")
        ax.set_xscale("log", base=2)
        ax.legend()

    def ttft(ax: Any) -> None:
        for r in runs:
            values = sorted(r.get("ttft_ms_values") or [])
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=_run_name(r))
        ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT distribution")
        ax.legend(fontsize="small")

    def bars(ax: Any) -> None:
        names = [_run_name(r) for r in runs]
        values = [r["metrics"]["output_throughput"] for r in runs]
        bars = ax.bar(range(len(runs)), values, color=[f"C{labels.index(r['label'])}" for r in runs])
        for b, r in zip(bars, runs, strict=True):
            ax.annotate(f"hit {r['metrics']['cache_hit_rate']:.0%}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize="small")
        ax.set_xticks(range(len(runs)), names, rotation=30, ha="right", fontsize="small")
        title = " / ".join(n for n, key in (("radix on", main), ("off", "no-radix"), ("HF", "hf"))
                           if any(label.startswith(key) for label in labels))
        ax.set(ylabel="output tokens / s", title=title if len(labels) > 1 else "throughput by run")

    panels = [by_point] if swept else []
    if any(r.get("ttft_ms_values") for r in runs):
        panels.append(ttft)
    return panels + [bars]


def _run_name(run: dict[str, Any]) -> str:
    at = [f"{k.split('_')[-1]} {run[k]}" for k in POINT_KEYS if run.get(k) is not None]
    return run["label"] + (f" ({', '.join(at)})" if at else "") + (f" [{run['dtypes']}]" if run.get("dtypes") else "")


def _one_batch_panels(report: dict[str, Any]) -> list:
    def panel(phase: str) -> Any:
        def draw(ax: Any) -> None:
            for n, input_len in enumerate(sorted({r["input_len"] for r in report["runs"]})):
                rs = sorted((r for r in report["runs"] if r["input_len"] == input_len), key=lambda r: r["batch_size"])
                xs = [r["batch_size"] for r in rs]
                ax.plot(xs, [r[f"{phase}_ms"] for r in rs], marker="o", color=f"C{n}", label=f"in {input_len}")
                floors = [r[f"{phase}_floor_ms"] for r in rs]
                if all(f is not None for f in floors):
                    ax.plot(xs, floors, ls="--", color=f"C{n}", label=f"in {input_len} floor")
            unit = "ms (whole batch)" if phase == "prefill" else "ms per step"
            ax.set(xlabel="batch size", ylabel=unit, title=f"{phase} latency")
            ax.set_xscale("log", base=2)
            ax.legend(fontsize="small")
        return draw

    return [panel("prefill"), panel("decode")]
