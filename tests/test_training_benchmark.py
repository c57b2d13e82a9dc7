"""The training-methods benchmark runs end to end (smoke size: a couple of epochs, not results)."""

import json
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
    payload = json.loads((tmp_path / "training_methods.json").read_text())
    results = {name: runs["0"] for name, runs in payload["results"].items()}  # one seed
    assert list(results) == ["dense", "rigl", "l0", "sparse_vd", "lottery"]  # dense first: the reference
    assert all(0.0 <= r["sparsity"] < 1.0 and 0.0 <= r["accuracy"] <= 1.0 for r in results.values())
    assert results["dense"]["sparsity"] == 0.0
    assert results["dense"]["accuracy"] > 0.5  # even two epochs learn digits (chance is 0.1)
    assert results["rigl"]["sparsity"] == pytest.approx(0.9, abs=1e-3)  # constant sparsity, as configured
    assert results["lottery"]["sparsity"] == pytest.approx(1 - 0.5**4, abs=1e-4)  # 4 rounds of 50% of the rest
    # the table is the JSON, row for row: sparsity %, accuracy % and the difference to dense
    table = (tmp_path / "training_methods.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == len(results)
    dense = results["dense"]["accuracy"]
    for row, (name, r) in zip(rows, results.items()):
        assert row[1] == f"{100 * r['sparsity']:.1f}%", (name, row)
        assert row[2] == f"{100 * r['accuracy']:.1f}", (name, row)
        assert row[3] == ("" if name == "dense" else f"{100 * (r['accuracy'] - dense):+.1f}"), (name, row)
