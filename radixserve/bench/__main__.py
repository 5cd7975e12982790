"""`python -m radixserve.bench MODE ...` is `radixserve bench MODE ...`."""

import argparse
import sys

from radixserve.bench import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="radixserve bench", description="benchmark radixserve")
    cli.add_cli_args(parser)
    sys.exit(cli.run(parser.parse_args()))
