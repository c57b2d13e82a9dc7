"""The seed-methods benchmark runs end to end (smoke size: a few epochs, not results)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_seed_methods_benchmark_smoke_run(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seed_methods.py"), "--quick", "--seeds", "1",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "seed_methods.md").read_text()
    for row in ("| 90% local: OBS |", "| LeNet-5 90% local: OBS |", "| Han's rule, q=1 |", "| 50% neurons: taylor_so |", "| DNS c=2 |",
                "| targeted dropout, pruned 75% |", "| FLOPs 10%: greedy allocation |"):
        assert row in table, table
