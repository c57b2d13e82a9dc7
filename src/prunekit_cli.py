"""The ``prunekit`` console command's entry point: catches Ctrl-C before the heavy imports.

``import prunekit`` imports torch, which takes seconds; a Ctrl-C in that time would otherwise end in a
40-line traceback. This module imports nothing heavy itself, so it can turn that into one line and exit
status 130, like a Ctrl-C later on (which ``prunekit.cli.main`` handles).
"""

from __future__ import annotations

import sys


def main() -> int:
    """Import ``prunekit.cli`` and run it; 130 with one line on stderr when interrupted while importing."""
    try:
        from prunekit.cli import main as run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
