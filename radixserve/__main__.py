"""`python -m radixserve ...` is the `radixserve` command."""

import sys

from radixserve.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
