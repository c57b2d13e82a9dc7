"""``python -m prunekit``: the ``prunekit`` command, through the same entry point as the console script."""

import sys

from prunekit_cli import main

if __name__ == "__main__":
    sys.exit(main())
