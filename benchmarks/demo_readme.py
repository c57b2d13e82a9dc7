"""Write the README's demo table from the demo's own results, so the two never differ.

    .venv/bin/python benchmarks/demo_readme.py            # from benchmarks/results/demo.json
    .venv/bin/python benchmarks/demo_readme.py --run      # run `prunekit demo` first and keep its results.json

The table sits between the README's ``<!-- demo:table ... -->`` lines; tests/test_demo.py checks that it is
what :func:`prunekit.demo.readme_table` makes of ``benchmarks/results/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from prunekit.demo import README_BEGIN, README_END, demo, readme_table
from prunekit.fileio import atomic_write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "demo.json"
README = ROOT / "README.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the full demo first (about a minute)")
    args = parser.parse_args()
    if args.run:
        with tempfile.TemporaryDirectory() as folder:
            demo(Path(folder) / "demo", progress=False)
            shutil.copyfile(Path(folder) / "demo" / "results.json", RESULTS)
    text = README.read_text(encoding="utf-8")
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    table = readme_table(json.loads(RESULTS.read_text(encoding="utf-8")))
    atomic_write(README, text[:start] + table + text[end:])
    print(table)


if __name__ == "__main__":
    main()
