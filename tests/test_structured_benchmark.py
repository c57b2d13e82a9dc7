"""The structured speedup benchmark runs (tiny) and reports consistent numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_structured_speedup_benchmark_smoke_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "structured_speedup.py"), "--models", "resnet8", "--ratios", "0.5",
         "--batches", "32", "--size", "16", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "structured_speedup.json").read_text())
    (row,) = data["rows"]
    assert row["channels_removed"] == 0.5 and row["params_pruned"] < row["params_dense"] / 2
    assert 3.0 < row["theoretical_speedup"] < 4.5  # half the channels: about a quarter of the conv FLOPs
    assert row["efficiency"] == row["measured_speedup"] / row["theoretical_speedup"]
    assert data["breakdown_batch32_ratio0.5"]["resnet8"]
    assert "<!-- benchmark:structured_speedup -->" in (tmp_path / "structured_speedup.md").read_text()
