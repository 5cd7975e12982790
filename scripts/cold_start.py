"""Ready means ready, checked from outside on a GPU: start a server with FlashInfer's JIT cache emptied, and at
the moment it says ready send N concurrent streamed requests (sampled with every filter, some with logprobs and
penalties, some greedy); then a second wave of new prompts, kernels built. Prints the start time, each wave's slowest
first token and whether every stream completed.

    python scripts/cold_start.py [--model-path radixserve/model_configs/llama-3.1-8b] [--clients 128]
        [--keep-jit-cache] [extra `radixserve serve` flags after --]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from radixserve.bench.server_process import ServerProcess  # noqa: E402


def request_body(i: int, vocab: int, prompt_len: int, output_len: int) -> dict:
    """Request i of a wave: every fourth greedy, the rest sampled with a mix of filters, penalties and logprobs."""
    rng = random.Random(i)
    sampling: dict = {"max_new_tokens": output_len, "ignore_eos": True}
    if i % 4 == 0:
        sampling["temperature"] = 0
    else:
        sampling |= {"temperature": 0.8, "top_p": 0.9 if i % 2 else 1.0, "top_k": 40 if i % 3 == 0 else -1,
                     "min_p": 0.05 if i % 5 == 0 else 0.0}
        if i % 7 == 0:
            sampling |= {"frequency_penalty": 0.5, "repetition_penalty": 1.1}
        if i % 11 == 0:
            sampling["seed"] = i
    return {"input_ids": [rng.randrange(100, vocab) for _ in range(prompt_len)], "sampling_params": sampling,
            "stream": True, "return_logprob": i % 6 == 1, "top_logprobs_num": 2 if i % 12 == 1 else 0}


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[float | None, int]:
    """(seconds to the first token, tokens received)."""
    start, first, tokens = time.monotonic(), None, 0
    async with session.post(f"{url}/generate", json=body) as resp:
        async for line in resp.content:
            if not line.startswith(b"data:") or b"[DONE]" in line:
                continue
            out = json.loads(line[5:])
            if first is None and out.get("output_ids"):
                first = time.monotonic() - start
            tokens = len(out.get("output_ids", []))
    return first, tokens


async def wave(url: str, first: int, n: int, vocab: int, prompt_len: int, output_len: int) -> dict:
    """Requests first .. first + n - 1 at once (the warm wave takes new prompts, so no radix hit flatters it)."""
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.monotonic()
        results = await asyncio.gather(*(one_stream(session, url, request_body(i, vocab, prompt_len, output_len))
                                         for i in range(first, first + n)), return_exceptions=True)
    firsts = sorted(r[0] for r in results if isinstance(r, tuple) and r[0] is not None)
    complete = sum(isinstance(r, tuple) and r[1] == output_len for r in results)
    return {"streams": n, "complete": complete, "errors": [repr(r) for r in results if isinstance(r, BaseException)],
            "first_token_max_s": round(firsts[-1], 3) if firsts else None,
            "first_token_p50_s": round(firsts[len(firsts) // 2], 3) if firsts else None,
            "wave_s": round(time.monotonic() - started, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=str(REPO / "radixserve/model_configs/llama-3.1-8b"))
    p.add_argument("--clients", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--keep-jit-cache", action="store_true", help="do not empty ~/.cache/flashinfer first")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    ns, serve_flags = p.parse_known_args()
    serve_flags = [f for f in serve_flags if f != "--"]
    cache = Path.home() / ".cache" / "flashinfer"
    if not ns.keep_jit_cache and cache.exists():
        shutil.rmtree(cache)
    config = json.loads((Path(ns.model_path) / "config.json").read_text())
    started = time.monotonic()
    server = ServerProcess(["--model-path", ns.model_path, "--load-format", "dummy", "--skip-tokenizer-init",
                            "--max-running-requests", str(ns.clients), *serve_flags], log_name="cold-start")
    try:
        server.wait_ready(timeout=1200)
        report = {"start_s": round(time.monotonic() - started, 1), "jit_cache_emptied": not ns.keep_jit_cache}
        for name, first in (("cold", 0), ("warm", ns.clients)):
            report[name] = asyncio.run(wave(server.url, first, ns.clients, config["vocab_size"], ns.prompt_len,
                                            ns.output_len))
    finally:
        server.terminate(timeout=30)
        shutil.copy(server.log_path, Path(ns.out) / "cold_start_server.log")
    print(json.dumps(report, indent=1))
    (Path(ns.out) / "cold_start.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
