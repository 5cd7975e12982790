"""`python -m radixserve.bench MODE ...` is `radixserve bench MODE ...`."""

import sys

from radixserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
