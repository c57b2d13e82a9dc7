"""The LLM pruning benchmark runs end to end at smoke size and checks its own results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_llm_pruning_benchmark_smoke_run(tmp_path):
    # Exit status 1 when a child fails or a pruned model's sparsity is not the requested one.
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "llm_pruning.py"), "--model", "tiny", "--samples", "4",
         "--seq-len", "32", "--eval-tokens", "128", "--random-ids", "--no-minilm", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "llm_pruning.json").read_text())
    runs = {r["method"]: r for r in data["runs"]}
    assert set(runs) == {"sparsegpt", "wanda", "magnitude"}
    for r in runs.values():
        assert r["sparsity"] == pytest.approx(0.5) and len(r["block_seconds"]) == 2 and r["peak_extra_bytes"] >= 0
    assert "| `sparsegpt` |" in (tmp_path / "llm_pruning.md").read_text()
