"""The training-methods benchmark runs end to end (smoke size: a couple of epochs, not results)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_training_methods_benchmark_smoke_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "training_methods.py"), "--quick", "--seeds", "1",
         "--methods", "rigl", "l0", "sparse_vd", "lottery", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "training_methods.md").read_text()
    rows = ("| dense (30 epochs) |", "| RigL, ERK (Evci 2020) | 90.0% |",
            "| lottery ticket, IMP, rewind to init | 93.7% |")  # 3137 of 50,200 weights kept
    for row in rows:
        assert row in table, table
    assert (tmp_path / "training_methods.json").exists()
