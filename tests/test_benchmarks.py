"""The benchmark scripts run, and their own correctness checks hold (small smoke sizes)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_global_magnitude_benchmark_smoke_run_agrees_with_torch(tmp_path):
    # The script exits 1 when prunekit's masks differ from torch.nn.utils.prune.global_unstructured's.
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "global_magnitude.py"), "--params", "5e6", "--repeats", "1",
         "--sparsity", "0.9", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "global_magnitude.md").read_text()
    assert "Masks identical (bit for bit) in every configuration: **yes**" in table
