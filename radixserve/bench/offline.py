"""`bench offline`: the in-process Engine over a dataset (request and token throughput, cache hit rate),
and in the same run the baselines: `no-radix` (a second Engine with the radix cache off) and `hf`
(transformers `generate`, batched). Turn k of every conversation is one `generate` call ("round")."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
from tqdm import tqdm

from radixserve.bench import report as rep
from radixserve.bench.datasets import Conversation, DatasetArgs, load_dataset, num_requests, tokenizer_and_vocab
from radixserve.bench.metrics import RequestResult
from radixserve.config import ServerArgs

if TYPE_CHECKING:
    from radixserve import Engine

BASELINES = ("no-radix", "hf")
WARMUP_LEN = 16
GenerateFn = Callable[[list[list[int]], list[int]], list[tuple[list[int], RequestResult]]]


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("offline")
    g.add_argument("--baseline", choices=BASELINES, action="append", default=[],
                   help="also run this baseline on the same prompts (repeatable)")
    g.add_argument("--hf-batch-size", type=int, nargs="+",
                   help="prompts per HF generate call (default: --max-running-requests); several: one HF run "
                        "each, and the report compares with the best")
    g.add_argument("--hf-num-prompts", type=int,
                   help="run HF on the first N conversations only (throughputs are rates, so they compare)")


def run(ns: argparse.Namespace) -> int:
    args = ServerArgs.from_cli_args(ns)
    tokenizer, vocab_size = tokenizer_and_vocab(args)
    convs = load_dataset(DatasetArgs.from_cli_args(ns), tokenizer, vocab_size)
    report = rep.new_report("offline", ns)
    variants = [(ns.label, args)]
    if "no-radix" in ns.baseline:
        variants.append(("no-radix", args.replace(disable_radix_cache=True)))
    from radixserve import Engine

    for label, engine_args in variants:
        with Engine(**dataclasses.asdict(engine_args)) as engine:
            report["engine"] = msgspec.to_builtins(engine.runtime)
            model_dir = engine.model_dir
            gen = _engine_fn(engine)
            gen([list(range(1, WARMUP_LEN + 1))], [WARMUP_LEN])
            engine.flush_cache()
            report["runs"].append(_timed_run(label, convs, gen, report["engine"]))
    if "hf" in ns.baseline:
        report["runs"] += _hf_runs(model_dir, args, report["engine"], convs[:ns.hf_num_prompts],
                                   ns.hf_batch_size or [args.max_running_requests])
    rep.print_runs(report)
    rep.finish(report, ns)
    return int(any(r["metrics"]["failed"] for r in report["runs"]))


def _hf_runs(model_dir: str, args: ServerArgs, engine_info: dict, convs: list[Conversation],
             batch_sizes: list[int]) -> list[dict]:
    """One HF run per batch size, labelled `hf` (one size) or `hf-bsB` (a sweep)."""
    from radixserve.bench.hf_baseline import HFBaseline

    hf = HFBaseline(model_dir, args.load_format, engine_info["device"], engine_info["dtype"])
    hf.generate([list(range(1, WARMUP_LEN + 1))], [WARMUP_LEN], batch_size=1)
    runs = []
    for bs in batch_sizes:
        label = "hf" if len(batch_sizes) == 1 else f"hf-bs{bs}"
        runs.append(_timed_run(label, convs, lambda p, n, bs=bs: hf.generate(p, n, batch_size=bs),
                               {"dtype": engine_info["dtype"]}))
        runs[-1]["batch_size"] = bs
    hf.close()
    return runs


def _engine_fn(engine: Engine) -> GenerateFn:
    def generate(prompts: list[list[int]], output_lens: list[int]) -> list[tuple[list[int], RequestResult]]:
        params = [{"max_new_tokens": n, "ignore_eos": True, "temperature": 0.0} for n in output_lens]
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        return [(o["output_ids"], RequestResult(o["meta_info"]["prompt_tokens"], o["meta_info"]["completion_tokens"],
                                                o["meta_info"]["cached_tokens"])) for o in outs]
    return generate


def _timed_run(label: str, convs: list[Conversation], generate: GenerateFn, runtime: dict) -> dict:
    results, duration = run_rounds(convs, generate, rep.progress(num_requests(convs), label))
    return rep.record(label, results, duration, runtime)


def run_rounds(convs: list[Conversation], generate: GenerateFn,
               progress: tqdm) -> tuple[list[RequestResult], float]:
    """Every conversation's turn k in one call, k = 0, 1, ...; a turn's prompt is its conversation so far
    (earlier prompts and outputs) plus its new tokens. Returns the results and the time spent generating."""
    histories: list[list[int]] = [[] for _ in convs]
    results: list[RequestResult] = []
    duration = 0.0
    for k in range(max(len(c) for c in convs)):
        live = [c for c in range(len(convs)) if k < len(convs[c])]
        prompts = [histories[c] + convs[c][k].input_ids for c in live]
        t0 = time.perf_counter()
        outs = generate(prompts, [convs[c][k].output_len for c in live])
        duration += time.perf_counter() - t0
        for c, prompt, (output_ids, result) in zip(live, prompts, outs, strict=True):
            histories[c] = prompt + output_ids
            result.turn = k
            results.append(result)
        progress.update(len(live))
    progress.close()
    return results, duration
