"""The `bench` subcommand: one sub-parser per mode, each with the dataset, output and server / engine flags."""

from __future__ import annotations

import argparse
import importlib

from radixserve.bench import datasets, report
from radixserve.config import ServerArgs

MODES: dict[str, tuple[str, str]] = {  # name -> (module, help)
    "serve": ("radixserve.bench.serve", "a running server over HTTP, streamed: throughput, TTFT, ITL, TPOT, latency"),
    "offline": ("radixserve.bench.offline", "the in-process Engine over a dataset: throughput, cache hit rate"),
    "one-batch": ("radixserve.bench.one_batch", "prefill and decode latency of a static batch, beside the floor"),
    "check-determinism": ("radixserve.bench.determinism", "mismatched tokens alone, batched, radix-cached, chunked "
                          "(the --check-determinism of issue 28)"),
}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    for name, (module, help_text) in MODES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_cli_args(p)
        if name in ("serve", "offline"):
            datasets.add_cli_args(p)
        report.add_cli_args(p)
        ServerArgs.add_cli_args(p.add_argument_group(
            "server / engine (offline and one-batch: the Engine's; serve: the --launch-server's, and the "
            "tokenizer or vocabulary prompts are made from)"))


def run(ns: argparse.Namespace) -> int:
    return importlib.import_module(MODES[ns.mode][0]).run(ns)
