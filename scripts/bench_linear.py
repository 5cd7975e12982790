"""The linear layers of a decode step on one GPU: cuBLAS (F.linear), cuBLASLt and worker_proc.gemv side by side.

"gemv" is the launch shape the worker uses (gemv.config_for), or the tensor-core default where the worker
keeps cuBLAS. Each figure is one call's share of a CUDA graph that runs the projection over distinct copies of its
weight (as a model's layers do: nothing stays in L2), against the floor of reading the weight at the copy rate.
  python scripts/bench_linear.py [--rows 1 2 4 8 16 64] [--models llama-3.1-8b qwen2.5-7b llama-3.1-70b:2] [--sweep]
--sweep also times every gemv launch shape of a small grid and reports the best per projection and rows.
--fp8: the decoder's projections with e4m3 weights (worker_proc.fp8; the LM head stays bf16): the GEMV on the FP8
weight ("gemv") against _scaled_mm with x quantized per token ("scaled_mm"), against the floor of reading n x k bytes.
--deterministic: worker_proc.batch_invariant's matmul (--enable-deterministic-inference) against cuBLAS at each
--rows, with its default launch shape ("invariant") and with the one the worker keeps up to SMALL_M rows
(choose_small_tiles: "worker"); with --sweep, every launch shape of a small grid (each checked to give row 0 the
same bits at 1 row and at the most rows, and whether its bits equal the default shape's: if so, two shapes could
serve different batch sizes), the best per rows, and the one with the least summed ratio to the best over all rows.
Prints a table; JSON to $OUT (default .)/bench_linear.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gpu_check import _sync_time, section_ceilings  # noqa: E402 (this script's folder)

from worker_proc import batch_invariant, fp8, gemv  # noqa: E402
from worker_proc.cuda_graph import DecodeGraphs  # noqa: E402

SWEEP_CUDA_CORES = [gemv.Config(*c, False) for c in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (1, 2, 3))]
SWEEP_TENSOR_CORES = [gemv.Config(*c, True) for c in itertools.product((16, 32, 64), (64, 128, 256), (4,), (2, 3, 4))]
# An e4m3 weight carries half the bytes per column: the FP8 grid reaches twice as deep along K.
SWEEP_FP8_CUDA_CORES = [gemv.Config(*c, False)
                        for c in itertools.product((4, 8, 16), (1024, 2048, 4096), (4, 8), (2, 3, 4))]
SWEEP_FP8_TENSOR_CORES = [gemv.Config(*c, True)
                          for c in itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 4))]

# rows, K step, stages, warps, output tile width (0: the per-weight default)
SWEEP_INVARIANT = [batch_invariant.Tiles(*c)
                   for c in itertools.product((16, 64, 128), (64, 128, 256), (3, 4), (4,), (0, 16))]


def projections(model: str, tp: int) -> dict[str, tuple[int, int, bool]]:
    """name -> (n, k, bias) of one tensor-parallel rank's decoder projections and LM head."""
    c = json.loads((ROOT / "radixserve" / "model_configs" / model / "config.json").read_text())
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // heads
    bias = c["model_type"] == "qwen2"
    return {"qkv": ((heads + 2 * kv) * d // tp, h, bias), "o": (h, heads * d // tp, False),
            "gate_up": (2 * c["intermediate_size"] // tp, h, False), "down": (h, c["intermediate_size"] // tp, False),
            "lm_head": (c["vocab_size"] // tp, h, False)}


def graph_seconds(calls: list, replays: int = 10) -> float:
    """Seconds per call of `calls`, captured once into one CUDA graph (as the worker captures its decode graphs),
    from the median replay of `replays`."""
    graphs = DecodeGraphs()
    graphs.capture(0, lambda: [call() for call in calls])
    return _sync_time(lambda: graphs.replay(0), replays) / len(calls)


def best_config(rows: int, calls_for: Callable[[gemv.Config], list], fp8: bool = False) -> tuple[float, list]:
    """(us per call, launch shape) of the fastest gemv launch shape of the sweep's grid (the FP8 grid with `fp8`)
    for `rows` rows; `calls_for(config)`: the calls to time with it."""
    tensor_cores, cuda_cores = (SWEEP_FP8_TENSOR_CORES, SWEEP_FP8_CUDA_CORES) if fp8 else \
        (SWEEP_TENSOR_CORES, SWEEP_CUDA_CORES)
    timed = []
    for c in tensor_cores + (cuda_cores if rows == 1 else []):
        try:
            timed.append((graph_seconds(calls_for(c), 5), c))
        except Exception:  # noqa: BLE001 (a launch shape past the shared memory: not a candidate)
            continue
    best = min(timed, key=lambda t: t[0])
    return best[0] * 1e6, list(best[1])


def time_projection(n: int, k: int, bias: bool, rows_list: list[int], sweep: bool, bw: float) -> dict:
    nbytes = n * k * 2
    copies = max(2, -(-(1 << 31) // nbytes))  # >= 2 GiB of weights per graph
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
    b = torch.randn(n, dtype=torch.bfloat16, device="cuda") if bias else None
    res = {"n": n, "k": k, "bias": bias, "MB": nbytes / 1e6, "floor_us": nbytes / bw * 1e6}
    for rows in rows_list:
        x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
        r = res[f"rows{rows}"] = {}
        r["cublas_us"] = graph_seconds([lambda w=w, x=x: F.linear(x, w, b) for w in ws]) * 1e6
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            r["cublaslt_us"] = graph_seconds([lambda w=w, x=x: F.linear(x, w, b) for w in ws]) * 1e6
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")
        if rows <= 64:
            chosen = gemv.config_for(rows, n, k)
            r["worker_uses"] = "gemv" if chosen else "cublas"
            cfg = chosen or gemv.Config(32, 256, 4, 4, True)
            want = F.linear(x, ws[0], b).float()
            got = gemv.gemv(x, ws[0], b, cfg).float()
            r["gemv_rel_err"] = ((got - want).norm() / want.norm()).item()
            r["gemv_us"] = graph_seconds([lambda w=w, x=x, cfg=cfg: gemv.gemv(x, w, b, cfg) for w in ws]) * 1e6
            if sweep and rows in (1, 16, 64):
                r["gemv_best_us"], r["gemv_best_config"] = best_config(
                    rows, lambda c, x=x, few=ws[:4]: [lambda w=w: gemv.gemv(x, w, b, c) for w in few])
    del ws
    torch.cuda.empty_cache()
    return res


def time_fp8_projection(n: int, k: int, rows_list: list[int], sweep: bool, bw: float) -> dict:
    """An FP8 (e4m3, per-channel scales) projection: the GEMV and _scaled_mm, as time_projection times bf16."""
    copies = max(2, -(-(1 << 31) // (n * k)))
    ws = [fp8.quantize_rows(torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02) for _ in range(copies)]
    res = {"n": n, "k": k, "MB": n * k / 1e6, "floor_us": n * k / bw * 1e6}
    for rows in rows_list:
        x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
        r = res[f"rows{rows}"] = {}
        r["scaled_mm_us"] = graph_seconds([lambda q=q, s=s, x=x: fp8.scaled_mm(x, q, s.view(1, -1), None)
                                           for q, s in ws]) * 1e6
        if rows <= 64:
            chosen = gemv.config_for(rows, n, k, fp8=True)
            r["worker_uses"] = "gemv" if chosen else "scaled_mm"
            cfg = chosen or gemv.Config(32, 256, 4, 4, True)
            r["gemv_us"] = graph_seconds([lambda q=q, s=s, x=x, cfg=cfg: gemv.gemv(x, q, None, cfg, scale=s)
                                          for q, s in ws]) * 1e6
            if sweep and rows in (1, 16, 64):
                r["gemv_best_us"], r["gemv_best_config"] = best_config(
                    rows, lambda c, x=x, few=ws[:4]: [lambda q=q, s=s: gemv.gemv(x, q, None, c, scale=s)
                                                      for q, s in few], fp8=True)
    del ws
    torch.cuda.empty_cache()
    return res


def time_invariant_projection(n: int, k: int, rows_list: list[int], sweep: bool, bw: float) -> dict:
    """batch_invariant.matmul at each row count against cuBLAS (time_projection's timing); with `sweep`, each
    launch shape of SWEEP_INVARIANT that keeps row 0's bits across row counts."""
    copies = max(2, -(-(1 << 31) // (n * k * 2)))
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
    res = {"n": n, "k": k, "MB": n * k * 2 / 1e6, "floor_us": n * k * 2 / bw * 1e6}
    xs = {rows: torch.randn(rows, k, dtype=torch.bfloat16, device="cuda") for rows in rows_list}
    x_most = xs[max(rows_list)]
    batch_invariant.PLANS.clear()
    for rows, x in xs.items():
        r = res[f"rows{rows}"] = {}
        r["cublas_us"] = graph_seconds([lambda w=w, x=x: F.linear(x, w) for w in ws]) * 1e6
        r["invariant_us"] = graph_seconds([lambda w=w, x=x: batch_invariant.matmul(x, w.t()) for w in ws]) * 1e6
    # what the worker runs: the launch shape choose_small_tiles keeps up to SMALL_M rows
    res["worker_tiles"] = str(batch_invariant.choose_small_tiles(ws, batch_invariant._gpu_seconds)[n, k])
    for rows, x in xs.items():
        res[f"rows{rows}"]["worker_us"] = graph_seconds([lambda w=w, x=x: batch_invariant.matmul(x, w.t())
                                                         for w in ws]) * 1e6
    batch_invariant.PLANS.clear()
    if sweep:
        shapes = {}
        for tiles in SWEEP_INVARIANT:
            try:
                one = batch_invariant.matmul(x_most[:1], ws[0].t(), tiles)
                if not torch.equal(one, batch_invariant.matmul(x_most, ws[0].t(), tiles)[:1]):
                    shapes[str(tiles)] = "row 0 differs"
                    continue
                shapes[str(tiles)] = {rows: graph_seconds([lambda w=w, x=x, t=tiles: batch_invariant.matmul(x, w.t(), t)
                                                           for w in ws[:4]], 5) * 1e6 for rows, x in xs.items()}
                # whether two launch shapes could serve different batch sizes: the same bits as the default's
                shapes[str(tiles)]["bits_of_default"] = torch.equal(one, batch_invariant.matmul(x_most[:1], ws[0].t()))
            except Exception as e:  # noqa: BLE001 (past the shared memory: not a candidate)
                shapes[str(tiles)] = f"{type(e).__name__}"
        timed = {t: v for t, v in shapes.items() if isinstance(v, dict)}
        for rows in rows_list:
            best = min(timed, key=lambda t: timed[t][rows])
            res[f"rows{rows}"].update(best_us=timed[best][rows], best=best)
        res["best_overall"] = min(timed, key=lambda t: sum(timed[t][r] / res[f"rows{r}"]["best_us"] for r in rows_list))
        res["sweep"] = shapes
    del ws
    torch.cuda.empty_cache()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    p.add_argument("--models", nargs="+", default=["llama-3.1-8b", "qwen2.5-7b", "llama-3.1-70b:2"],
                   help="model_configs names, each optionally :tp (one rank's shapes)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--fp8", action="store_true", help="the projections with FP8 weights (the LM head stays bf16)")
    p.add_argument("--deterministic", action="store_true", help="batch_invariant.matmul against cuBLAS")
    args = p.parse_args()
    bw = section_ceilings()["copy_TBps"] * 1e12
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "copy_TBps": bw / 1e12,
           "commit": os.environ.get("GIT_COMMIT", ""), "models": {}}
    print(f"{out['gpu']}, torch {out['torch']}, copy rate {bw / 1e12:.2f} TB/s; us per call (% of the floor)")
    for spec in args.models:
        model, _, tp = spec.partition(":")
        res = out["models"][spec] = {}
        for name, (n, k, bias) in projections(model, int(tp or 1)).items():
            if args.fp8 and name == "lm_head":
                continue
            if args.deterministic:
                r = res[name] = time_invariant_projection(n, k, args.rows, args.sweep, bw)
            elif args.fp8:
                r = res[name] = time_fp8_projection(n, k, args.rows, args.sweep, bw)
            else:
                r = res[name] = time_projection(n, k, bias, args.rows, args.sweep, bw)
            for rows in args.rows:
                t = r[f"rows{rows}"]
                cells = [f"{key.removesuffix('_us')} {t[key]:7.1f} ({r['floor_us'] / t[key] * 100:3.0f}%)"
                         for key in ("cublas_us", "cublaslt_us", "scaled_mm_us", "gemv_us", "gemv_best_us",
                                     "invariant_us", "worker_us", "best_us")
                         if key in t]
                extra = f" best {t['gemv_best_config']}" if "gemv_best_config" in t else ""
                extra += f" best {t['best']}" if "best" in t else ""
                extra += f" -> worker: {t['worker_uses']}" if "worker_uses" in t else ""
                if "worker_tiles" in r:
                    extra += f" (worker up to {batch_invariant.SMALL_M} rows: {r['worker_tiles']})"
                print(f"{spec:18s} {name:8s} {n:6d}x{k:<6d} rows {rows:3d}: floor {r['floor_us']:7.1f} | "
                      + " | ".join(cells) + extra, flush=True)
            if "best_overall" in r:
                print(f"{spec:18s} {name:8s} best over all rows: {r['best_overall']}", flush=True)
    kind = "_fp8" if args.fp8 else "_deterministic" if args.deterministic else ""
    dest = Path(os.environ.get("OUT", ".")) / f"bench_linear{kind}.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
