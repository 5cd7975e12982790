"""FP8 weights and FP8 KV on one GPU, side by side in one run (about 5 minutes on an H100), on the Llama-3.1-8B
shape with dummy weights (radixserve/model_configs/llama-3.1-8b; FP8 ones quantized per channel on the GPU):

    python scripts/quant_gpu_check.py OUT_DIR [--sections graph-bf16 ...]

Sections, each in its own process (each starts on an empty GPU) under a time limit:
  graph-bf16, graph-fp8   ModelRunner (--cuda-graph-max-bs 2): GPU time of one replay of the batch-1 decode graph
                          at 512 tokens of context, and the whole step as the worker runs it, against the
                          weight-read floor: the bytes one step reads (every weight but the embedding table, of
                          which it reads one row, plus the context's KV) / this GPU's device-copy bandwidth,
                          measured in the same process (bytes read + written per second of a 2 GiB copy)
  e2e-bf16, e2e-fp8, e2e-fp8-kv
                          `radixserve bench offline` batch 1, 256 in / 1024 out (the issue's command): output tok/s
                          end to end, and max_total_tokens at the default --mem-fraction-static (0.85): bf16
                          weights with bf16 KV, FP8 weights with bf16 KV, bf16 weights with fp8_e4m3 KV
Writes OUT_DIR/results.json (and each bench's JSON, OUT_DIR/sections.log) and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gpu_check import run_child

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "radixserve" / "model_configs" / "llama-3.1-8b"
# Seconds each may take; the FP8-KV run may first compile FlashInfer's kernels for e4m3 K/V read by bf16 queries.
SECTIONS = {"graph-bf16": 150, "graph-fp8": 150, "e2e-bf16": 150, "e2e-fp8": 150, "e2e-fp8-kv": 360}
E2E = {"e2e-bf16": [], "e2e-fp8": ["--quantization", "fp8"], "e2e-fp8-kv": ["--kv-cache-dtype", "fp8_e4m3"]}
CONTEXT = 512


def graph_section(quantization: str | None) -> dict:
    """Batch-1 decode of the 8B shape through ModelRunner's CUDA graph, against its weight-read floor."""
    import torch
    from gpu_check import Synth, _copy_rate, _sync_time

    from radixserve.config import ServerArgs
    from worker_proc.model_runner import ModelRunner

    bandwidth = _copy_rate()
    torch.cuda.empty_cache()
    args = ServerArgs(model_path=str(MODEL), load_format="dummy", device="cuda", dtype="bfloat16",
                      quantization=quantization, max_running_requests=2, cuda_graph_max_bs=2, max_total_tokens=8192)
    t0 = time.monotonic()
    runner = ModelRunner(args, 0, str(MODEL))
    startup = time.monotonic() - t0
    with torch.no_grad():
        for t in runner.kv_cache.k + runner.kv_cache.v:
            t.copy_(torch.randn(t.shape, device=t.device))  # attention never reads zeros
    embed = runner.model.model.embed_tokens.weight
    step_bytes = runner.weight_bytes - embed.numel() * embed.element_size() + CONTEXT * runner.kv_bytes_per_token
    floor_ms = step_bytes / bandwidth * 1e3
    with torch.inference_mode():
        step_ms = Synth(runner).decode_loop(1, CONTEXT, 100) * 1e3
        graph_ms = _sync_time(lambda: runner.graphs.replay(1), 50) * 1e3
    info = runner.runtime_info()
    return {"gpu": torch.cuda.get_device_name(0), "copy_TBps": bandwidth / 1e12, "startup_s": startup,
            "weight_dtype": info.weight_dtype, "weight_GB": runner.weight_bytes / 1e9, "step_GB": step_bytes / 1e9,
            "floor_ms": floor_ms, "graph_ms": graph_ms, "graph_pct_of_floor": floor_ms / graph_ms * 100,
            "step_ms": step_ms, "step_tok_s": 1e3 / step_ms}


def e2e_section(name: str, out: Path) -> dict:
    """One `radixserve bench offline` run at batch 1; its output tok/s and its KV pool."""
    cmd = [sys.executable, "-m", "radixserve.bench", "offline", "--dataset", "random", "--num-prompts", "1",
           "--random-input-len", "256", "--random-output-len", "1024", "--random-range-ratio", "1",
           "--cuda-graph-max-bs", "2", "--model-path", str(MODEL), "--load-format", "dummy",
           "--skip-tokenizer-init", "--output-dir", str(out), "--output-name", name, "--label", name, "--no-plot",
           *E2E[name]]
    subprocess.run(cmd, check=True, cwd=ROOT)
    report = json.loads((out / f"{name}.json").read_text())
    engine, run = report["engine"], report["runs"][0]
    return {"command": " ".join(cmd[1:]), "output_tok_s": run["metrics"]["output_throughput"],
            "dtypes": run.get("dtypes"), "max_total_tokens": engine["num_kv_slots"] - 1,
            "kv_bytes_per_token": engine["kv_bytes_per_token"]}


def run_section(name: str, out: Path) -> dict:
    if name.startswith("graph-"):
        return graph_section(None if name == "graph-bf16" else "fp8")
    return e2e_section(name, out)


def summary(results: dict) -> str:
    lines = []
    for name in ("graph-bf16", "graph-fp8"):
        g = results.get(name, {})
        if "graph_ms" in g:
            lines.append(f"{name} on {g['gpu']}: batch-1 decode graph {g['graph_ms']:.2f} ms, floor "
                         f"{g['floor_ms']:.2f} ms ({g['step_GB']:.2f} GB at copy {g['copy_TBps']:.2f} TB/s): "
                         f"{g['graph_pct_of_floor']:.0f}% of the floor (target for fp8: 80%); whole step "
                         f"{g['step_ms']:.2f} ms = {g['step_tok_s']:.0f} tok/s")
    e = {k: results.get(k, {}) for k in E2E}
    for name, r in e.items():
        if "output_tok_s" in r:
            lines.append(f"{name} [{r['dtypes']}]: batch-1 end to end {r['output_tok_s']:.1f} output tok/s, "
                         f"max_total_tokens {r['max_total_tokens']} ({r['kv_bytes_per_token']} KV bytes per token)")
    if "output_tok_s" in e["e2e-bf16"] and "output_tok_s" in e["e2e-fp8"]:
        lines.append(f"fp8 / bf16 weights, batch-1 end to end: "
                     f"{e['e2e-fp8']['output_tok_s'] / e['e2e-bf16']['output_tok_s']:.2f}x (target 1.6x)")
    if "max_total_tokens" in e["e2e-bf16"] and "max_total_tokens" in e["e2e-fp8-kv"]:
        lines.append(f"fp8_e4m3 / bf16 KV, max_total_tokens at --mem-fraction-static 0.85: "
                     f"{e['e2e-fp8-kv']['max_total_tokens'] / e['e2e-bf16']['max_total_tokens']:.2f}x (target 1.9x)")
    lines += [f"{name}: ERROR {r['error'][-400:]}" for name, r in results.items() if "error" in r]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="directory for results.json, the benches' JSON and sections.log")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--section", help=argparse.SUPPRESS)  # internal: one section in this process, its
    parser.add_argument("--result", help=argparse.SUPPRESS)  # results to this file
    a = parser.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.section:
        Path(a.result).write_text(json.dumps(run_section(a.section, out), indent=1, default=str))
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "commit": os.environ.get("GIT_COMMIT", "?")}
    for name in a.sections:
        limit = SECTIONS[name]
        part = out / f"{name}.result.json"
        results[name] = run_child([sys.executable, __file__, str(out), "--section", name, "--result", str(part)],
                                  name, part, limit, out, env=env, cwd=ROOT)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(summary(results))


if __name__ == "__main__":
    main()
