"""The structured LLM benchmark runs end to end at smoke size, and its numbers hold what they claim."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a fresh interpreter importing transformers and building seven models: tens of seconds
def test_llm_structured_benchmark_smoke_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "llm_structured.py"), "--tiny", "--random-ids", "--no-minilm",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "llm_structured.json").read_text())
    rows = {r["variant"]: r for r in data["llama"]["rows"]}
    assert list(rows) == ["dense", "2:4", "width 25%", "width 50%", "depth 25%", "width + depth",
                          "width + depth + distill"]
    dense = rows["dense"]
    assert dense["kl_to_dense"] == pytest.approx(0.0, abs=1e-6)
    assert rows["2:4"]["block_params"] == dense["block_params"]  # masks: the same matrices
    assert rows["width 50%"]["block_params"] < rows["width 25%"]["block_params"] < dense["block_params"]
    assert rows["depth 25%"]["block_params"] == dense["block_params"] * 3 // 4  # 1 of 4 blocks
    assert [r["blocks"] for r in rows.values()] == [4, 4, 4, 4, 3, 3, 3]
    assert rows["width + depth + distill"]["block_params"] == rows["width + depth"]["block_params"]
    assert rows["width + depth + distill"]["loss_last"] < rows["width + depth + distill"]["loss_first"]
    for r in rows.values():
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["perplexity"] > 1
        assert r["kl_to_dense"] >= 0
    assert (tmp_path / "llm_structured.png").stat().st_size > 10_000
    assert "| width + depth + distill |" in (tmp_path / "llm_structured.md").read_text()
