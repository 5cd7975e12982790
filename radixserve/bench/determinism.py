"""`bench check-determinism`: whether a prompt's tokens depend on how it was served (issue 28's held-out check).

Each prompt runs alone on a cold cache (the reference); then every prompt in batches of each --batch-sizes (the
cache flushed before each size, so later batches hit the prefix that the prompts share); then all again in batches
of the largest size as radix hits (each whole prompt but its last token cached by the batches before); and in
batches of the largest size on a second Engine that prefills in --chunk-size chunks (a chunk may end inside one
prompt and the next begin another). Each greedy and with a per-request seed. Only the reference runs one prompt
at a time, so the check's time grows with the prompts, not with prompts x ways. A mismatch is one (way, prompt,
sampling) whose output ids differ from the reference. With --compare, the same runs without
--enable-deterministic-inference, for contrast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from radixserve.bench import report as rep
from radixserve.config import ServerArgs

if TYPE_CHECKING:
    from radixserve import Engine

SHARED = "You are a careful assistant. Answer in one short paragraph, plainly and without lists. "
TOPICS = ["the tides", "a compiler", "bread dough", "a violin", "glaciers", "the stock market", "bees", "a lighthouse"]


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("check-determinism")
    g.add_argument("--num-prompts", type=int, default=8)
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--chunk-size", type=int, default=32, help="--chunked-prefill-size of the chunked runs")
    g.add_argument("--compare", action="store_true", help="also run without --enable-deterministic-inference")
    g.add_argument("--compare-prompts", type=int, default=0,
                   help="the run without the flag on this many of the prompts (0: all), for a shorter contrast")


Prompt = str | list[int]


def prompts(n: int, token_ids: bool = False) -> list[Prompt]:
    """n prompts of different lengths that share a prefix (so batches after the first hit the radix cache):
    texts, or with `token_ids` (a server without a tokenizer, as with --skip-tokenizer-init) token ids of the
    same shape, below 32,000 so that any vocabulary holds them."""
    if token_ids:
        shared = random.Random(0).sample(range(100, 32000), 20)
        return [shared * (1 + i % 3) + random.Random(i + 1).sample(range(100, 32000), 12 + i % 5) for i in range(n)]
    return [SHARED * (1 + i % 3) + f"Question {i}: explain {TOPICS[i % len(TOPICS)]} to a child, "
            f"in {3 + i % 5} sentences." for i in range(n)]


def sampling(mode: str, i: int, max_new_tokens: int) -> dict:
    params = {"max_new_tokens": max_new_tokens, "ignore_eos": True}
    if mode == "greedy":
        return {**params, "temperature": 0.0}
    return {**params, "temperature": 1.0, "top_p": 0.9, "seed": 1000 + i}


def _outputs(engine: Engine, texts: list[Prompt], params: list[dict]) -> list[list[int]]:
    if texts and isinstance(texts[0], list):
        return [r["output_ids"] for r in engine.generate(input_ids=texts, sampling_params=params)]
    return [r["output_ids"] for r in engine.generate(texts, params)]


def batched(engine: Engine, texts: list[Prompt], params: list[dict], batch_size: int) -> list[list[int]]:
    return [ids for i in range(0, len(texts), batch_size)
            for ids in _outputs(engine, texts[i:i + batch_size], params[i:i + batch_size])]


def ways(engine: Engine, texts: list[Prompt], params: list[dict], batch_sizes: list[int]) -> dict[str, list]:
    """Every prompt's output ids served each way on one engine: alone (cold), batched, as radix hits."""
    out: dict[str, list] = {"alone": []}
    for text, p in zip(texts, params, strict=True):
        engine.flush_cache()
        out["alone"] += _outputs(engine, [text], [p])
    for bs in batch_sizes:
        engine.flush_cache()
        out[f"batch {bs}"] = batched(engine, texts, params, bs)
    out["radix hit"] = batched(engine, texts, params, max(batch_sizes))  # every prompt cached by the last size
    return out


def check(args: ServerArgs, num_prompts: int, batch_sizes: list[int], max_new_tokens: int,
          chunk_size: int) -> dict:
    """{"mismatches": n, "runs": n, "by_way": {way: n}} for an Engine made with `args` (one more with
    chunked_prefill_size=chunk_size)."""
    from radixserve import Engine

    texts = prompts(num_prompts, token_ids=args.skip_tokenizer_init)
    by_way: dict[str, int] = {}
    runs = 0
    served: dict[str, dict[str, list]] = {}
    with Engine(**dataclasses.asdict(args)) as engine:
        for mode in ("greedy", "seeded"):
            params = [sampling(mode, i, max_new_tokens) for i in range(num_prompts)]
            served[mode] = ways(engine, texts, params, batch_sizes)
            print(f"  {mode}: {', '.join(served[mode])} served", flush=True)
    with Engine(**dataclasses.asdict(args.replace(chunked_prefill_size=chunk_size))) as engine:
        for mode in ("greedy", "seeded"):
            params = [sampling(mode, i, max_new_tokens) for i in range(num_prompts)]
            engine.flush_cache()
            served[mode][f"chunks of {chunk_size}"] = batched(engine, texts, params, max(batch_sizes))
            print(f"  {mode}: chunks of {chunk_size} served", flush=True)
    for way_outputs in served.values():
        reference = way_outputs["alone"]
        for way, outputs in way_outputs.items():
            if way != "alone":
                bad = sum(a != b for a, b in zip(reference, outputs, strict=True))
                by_way[way] = by_way.get(way, 0) + bad
                runs += len(outputs)
    return {"mismatches": sum(by_way.values()), "runs": runs, "by_way": by_way}


def run(ns: argparse.Namespace) -> int:
    args = ServerArgs.from_cli_args(ns)
    args = args.replace(max_running_requests=max(args.max_running_requests, max(ns.batch_sizes)))
    report = rep.new_report("check-determinism", ns)
    flags = [True, False] if ns.compare else [True]
    for on in flags:
        t0 = time.monotonic()
        num_prompts = ns.num_prompts if on or not ns.compare_prompts else min(ns.compare_prompts, ns.num_prompts)
        result = check(args.replace(enable_deterministic_inference=on), num_prompts, ns.batch_sizes,
                       ns.max_new_tokens, ns.chunk_size)
        result.update(deterministic=on, seconds=round(time.monotonic() - t0, 1))
        report["runs"].append(result)
        print(f"{'with' if on else 'without'} --enable-deterministic-inference: {result['mismatches']} mismatches "
              f"in {result['runs']} runs {result['by_way']} ({result['seconds']} s)")
    out = Path(ns.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{ns.output_name or 'check-determinism-' + time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 1 if report["runs"][0]["mismatches"] else 0
