"""All-reduce on 2 GPUs of one host: worker_proc.parallel's symmetric-memory one-shot against NCCL.

    python3 scripts/bench_allreduce.py [--out DIR]

Checks that both give the same sums (bf16, eager and inside a CUDA graph), then times each inside
CUDA graphs of 64 back-to-back all-reduces per message size, as decode steps run them. Prints a table and
writes DIR/allreduce.json (DIR: $OUT, else the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_linear import graph_seconds  # noqa: E402 (this script's folder)

from worker_proc import parallel  # noqa: E402

SIZES_KIB = [16, 64, 256, 512, 1024, 2048, 4096]
CALLS_PER_GRAPH = 64


def _check(rank: int) -> dict:
    """p2p == NCCL in bf16, exactly (two addends: one rounding either way), eager and replayed from a graph."""
    gen = torch.Generator(device="cuda").manual_seed(rank)
    res = {}
    for rows in (1, 7, 64):
        x = torch.randn(rows, 8192, device="cuda", dtype=torch.bfloat16, generator=gen)
        want = x.clone()
        torch.distributed.all_reduce(want)
        got = parallel.tp_all_reduce(x.clone())
        res[f"rows{rows}_eager"] = bool(torch.equal(got, want))
    static = torch.zeros(4, 8192, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        parallel.tp_all_reduce(static)
    for step in range(3):
        x = torch.randn(4, 8192, device="cuda", dtype=torch.bfloat16, generator=gen)
        want = x.clone()
        torch.distributed.all_reduce(want)
        static.copy_(x)
        graph.replay()
        res[f"graph_replay{step}"] = bool(torch.equal(static, want))
    return res


def _rank(rank: int, port: int, out: str) -> None:
    torch.cuda.set_device(rank)
    parallel.init_tp(rank, 2, f"tcp://127.0.0.1:{port}", "nccl")
    parallel.P2P_MAX_BYTES = SIZES_KIB[-1] << 10  # room for every size timed here (2 ranks)
    on = parallel.enable_p2p_all_reduce(torch.bfloat16, [0, 1])
    result = {"p2p_enabled": on, "check": _check(rank) if on else {}, "us": {}}
    for kib in SIZES_KIB:
        x = torch.randn(kib * 512, device="cuda", dtype=torch.bfloat16)
        row = {"nccl": graph_seconds([lambda x=x: torch.distributed.all_reduce(x)] * CALLS_PER_GRAPH, 20) * 1e6}
        if on:
            row["p2p"] = graph_seconds([lambda x=x: parallel.tp_all_reduce(x)] * CALLS_PER_GRAPH, 20) * 1e6
        result["us"][kib] = row
    if rank == 0:
        print(f"symmetric memory: {on}; p2p == NCCL: {all(result['check'].values()) if on else 'n/a'}")
        print(f"{'KiB':>6} {'NCCL us':>8} {'p2p us':>8} {'NCCL/p2p':>9}")
        for kib, row in result["us"].items():
            p2p = row.get("p2p", float("nan"))
            print(f"{kib:>6} {row['nccl']:>8.1f} {p2p:>8.1f} {row['nccl'] / p2p:>9.2f}")
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "allreduce.json").write_text(json.dumps(result, indent=1))
    parallel.destroy_tp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("needs 2 GPUs")
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, args.out), nprocs=2)


if __name__ == "__main__":
    main()
