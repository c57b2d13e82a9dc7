"""Perplexity with a sliding window, on models whose logits are known, and calibration data."""

import math

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.llm.calibration import builtin_text, sample_windows
from prunekit.llm.perplexity import _token_nll, _windows, negative_log_likelihood


class Unigram(nn.Module):
    """Logits independent of the context: log q for a fixed distribution q."""

    def __init__(self, q):
        super().__init__()
        self.register_buffer("logq", torch.log(q))
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return self.logq.expand(*ids.shape, -1).clone()


class Bigram(nn.Module):
    """p(next | current) from a table; returns an object with .logits like Hugging Face models."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("logp", torch.log(table))
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        class Out:
            pass

        out = Out()
        out.logits = self.logp[ids]
        return out


def test_uniform_model_has_perplexity_vocab_size():
    model = Unigram(torch.full((7,), 1 / 7))
    ids = torch.randint(0, 7, (100,))
    assert pk.llm.perplexity(model, ids, seq_len=16) == pytest.approx(7.0, rel=1e-6)


@pytest.mark.parametrize("seq_len,stride", [(10, None), (10, 3), (10, 10), (64, None), (7, 1)])
def test_unigram_perplexity_by_hand(seq_len, stride):
    q = torch.tensor([0.5, 0.25, 0.125, 0.125])
    model = Unigram(q)
    ids = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3, 2, 0, 1, 1, 0, 2, 3, 0, 0, 1, 2, 0, 3, 1, 0])
    stride_ = seq_len if stride is None else stride
    # Which tokens are predicted: with overlap every token but the first; without, not the windows' first ones.
    predicted = [p for b, e, first in _windows(len(ids), seq_len, stride_) for p in range(first, e)]
    assert len(set(predicted)) == len(predicted)  # each at most once
    if stride_ < seq_len or seq_len >= len(ids):
        assert predicted == list(range(1, len(ids)))
    else:
        assert predicted == [p for p in range(1, len(ids)) if p % seq_len]
    expected = math.exp(-sum(math.log(q[ids[p]]) for p in predicted) / len(predicted))
    assert pk.llm.perplexity(model, ids, seq_len=seq_len, stride=stride) == pytest.approx(expected, rel=1e-6)
    total, count = negative_log_likelihood(model, ids, seq_len, stride)
    assert count == len(predicted)


def test_bigram_perplexity_by_hand_and_batching_and_several_streams():
    table = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    model = Bigram(table)
    ids = torch.tensor([0, 1, 0, 2, 2, 1, 1, 0, 1, 2, 0, 0, 1])
    nll = -sum(math.log(table[ids[p - 1], ids[p]]) for p in range(1, len(ids)))
    expected = math.exp(nll / (len(ids) - 1))
    for batch_size in (1, 3):
        assert pk.llm.perplexity(model, ids, seq_len=4, stride=2, batch_size=batch_size) == pytest.approx(expected)
    two = torch.stack([ids, ids.flip(0)])
    nll2 = nll - sum(math.log(table[two[1, p - 1], two[1, p]]) for p in range(1, len(ids)))
    assert pk.llm.perplexity(model, two, seq_len=len(ids)) == pytest.approx(math.exp(nll2 / (2 * (len(ids) - 1))))


def test_token_nll_in_chunks_equals_the_full_log_softmax():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 50, 1000) * 5, torch.randint(0, 1000, (3, 50))
    expected = -torch.log_softmax(logits, -1).gather(2, targets[..., None]).squeeze(-1)
    for chunk in (1, 3000, 7 * 3000 + 5, 1 << 20):  # one position at a time, 7 and a bit, all at once
        assert torch.allclose(_token_nll(logits, targets, chunk), expected, atol=1e-5, rtol=0)


def test_perplexity_bad_input():
    model = Unigram(torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="stride"):
        pk.llm.perplexity(model, torch.zeros(10, dtype=torch.long), seq_len=4, stride=5)
    with pytest.raises(ValueError, match="integer token ids"):
        pk.llm.perplexity(model, torch.zeros(10), seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        pk.llm.perplexity(model, torch.zeros(10, dtype=torch.long), seq_len=1)


def test_perplexity_of_a_tiny_hf_model_matches_its_own_loss():
    pytest.importorskip("transformers")
    from prunekit.llm.models import tiny_model

    model = tiny_model("llama")
    ids = pk.llm.random_calibration(256, 1, 32, seed=4)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert pk.llm.perplexity(model, ids[0], seq_len=32) == pytest.approx(math.exp(float(loss)), rel=1e-5)


class CharTokenizer:
    """Each character is a token (its code point mod 256)."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


@pytest.mark.slow
def test_builtin_text_has_disjoint_calibration_and_heldout_splits():
    cal, held = builtin_text("calibration"), builtin_text("heldout")
    assert len(cal) > 200_000 and len(held) > 50_000
    paragraphs = {p for p in held.split("\n\n") if len(p) > 200}
    assert not any(p in cal for p in list(paragraphs)[:50])
    sentences = pk.llm.builtin_sentences("heldout", n=50)
    assert len(sentences) == 50 and all(s[0].isupper() for s in sentences)
    with pytest.raises(ValueError, match="split"):
        builtin_text("train")
    # the built-in calibration text is the default source: every sample is a window of it
    calib = pk.llm.calibration_data(CharTokenizer(), num_samples=3, seq_len=40, seed=0)
    assert calib.shape == (3, 40)
    stream = bytes(CharTokenizer()(cal)["input_ids"])
    assert all(bytes(row.tolist()) in stream for row in calib)


def test_calibration_data_is_seeded_fixed_size_from_any_source(tmp_path):
    tok = CharTokenizer()
    text = [" ".join(f"word{i}" for i in range(400))]  # not the built-in text: parsing the stdlib takes seconds
    a = pk.llm.calibration_data(tok, texts=text, num_samples=5, seq_len=40, seed=1)
    b = pk.llm.calibration_data(tok, texts=text, num_samples=5, seq_len=40, seed=1)
    c = pk.llm.calibration_data(tok, texts=text, num_samples=5, seq_len=40, seed=2)
    assert a.shape == (5, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    f = tmp_path / "text.txt"
    f.write_text("abcdefghij" * 20)
    from_file = pk.llm.calibration_data(tok, files=[f], num_samples=3, seq_len=15)
    text_ids = torch.tensor([ord(ch) for ch in "abcdefghij" * 20])
    for row in from_file:  # every sample is a window of the text
        start = (row[0] - ord("a")).item()
        assert torch.equal(row, text_ids[start : start + 15])
    records = [{"text": "hello world " * 10}, {"text": "more text " * 10}]
    assert pk.llm.calibration_data(tok, texts=records, num_samples=2, seq_len=30).shape == (2, 30)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        pk.llm.calibration_data(tok, texts=["short"], num_samples=2, seq_len=30)
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        pk.llm.calibration_data(tok, files=[tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="no text field 'content'"):
        pk.llm.calibration_data(tok, texts=records, text_field="content")


def test_sample_windows_are_windows_of_the_stream():
    stream = torch.arange(1000)
    windows = sample_windows(stream, 20, 50, seed=0)
    assert torch.all(windows[:, 1:] - windows[:, :-1] == 1)
    assert windows.min() >= 0 and windows.max() < 1000
