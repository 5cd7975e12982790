"""The `radixserve` command line. Each subcommand is a module with `add_cli_args(parser)` and
`run(namespace) -> exit code`, registered in COMMANDS and imported only when it is run. Flags that
ServerArgs refuses together (FlagError) are a usage error, as a value the parser refuses alone is."""

from __future__ import annotations

import argparse
import importlib
import sys

from radixserve.config import FlagError

COMMANDS: dict[str, tuple[str, str]] = {  # name -> (module, help)
    "serve": ("radixserve.launch.serve", "serve a model over HTTP (SGLang-native and OpenAI-compatible APIs)"),
    "bench": ("radixserve.bench.cli",
              "benchmark a server (serve), the Engine (offline) or one static batch (one-batch)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="radixserve", description="LLM serving with RadixAttention prefix caching.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage, or the error for an unknown command, and exits
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"radixserve {name}", description=COMMANDS[name][1])
    module.add_cli_args(cmd_parser)
    ns = cmd_parser.parse_args(argv[1:])
    try:
        return module.run(ns)
    except FlagError as e:
        cmd_parser.error(str(e))
