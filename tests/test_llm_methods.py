"""SparseGPT, Wanda and magnitude on single layers: the math, checked by hand and against each other."""

import pytest
import torch

from prunekit.llm.methods import LLM_METHODS, Magnitude, get_method, parse_pattern
from prunekit.llm.sparsegpt import Hessian, SparseGPT, sparsegpt
from prunekit.llm.wanda import InputNorms, Wanda, wanda_mask, wanda_scores


def _layer(out=64, inp=256, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, inp, generator=g) @ torch.randn(inp, inp, generator=g) * 0.1  # correlated inputs
    X[:, :8] *= 4.0  # a few high-energy features, as LLM activations have
    W = torch.randn(out, inp, generator=g)
    return W, X


def _err(W, W2, X):
    return float(((W - W2) @ X.T).norm())


def test_hessian_is_2xxt_over_n_accumulated_in_batches():
    _, X = _layer()
    h = Hessian(X.shape[1])
    for chunk in X.split(300):
        h.add(chunk)
    assert h.tokens == X.shape[0]
    torch.testing.assert_close(h.H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)


def test_input_norms_and_wanda_scores_by_hand():
    x = torch.tensor([[1.0, 0.0, 2.0], [2.0, 3.0, -2.0]])  # two tokens, three features
    norms = InputNorms(3)
    norms.add(x[:1])
    norms.add(x[1:])
    torch.testing.assert_close(norms.norms, torch.tensor([5.0**0.5, 3.0, 8.0**0.5]))
    W = torch.tensor([[1.0, -2.0, 0.5], [-0.1, 0.2, 3.0]])
    scores = wanda_scores(W, norms.norms)
    expected = torch.tensor([[1 * 5**0.5, 2 * 3, 0.5 * 8**0.5], [0.1 * 5**0.5, 0.2 * 3, 3 * 8**0.5]])
    torch.testing.assert_close(scores, expected)
    # One weight per row goes (33%): row 0 loses 0.5*sqrt(8)=1.41 (not 1*sqrt(5)=2.24); in row 1 the scores
    # are 0.3*sqrt(5)=0.67 < 0.25*3=0.75, so the 0.3 goes although 0.25 is smaller.
    W = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.25, 3.0]])
    keep = wanda_mask(W, norms.norms, 1 / 3)
    assert keep.tolist() == [[True, True, False], [False, True, True]]
    # Magnitude per row (Wanda with unit norms) drops the 0.25 instead: the activations change the decision.
    assert wanda_mask(W, torch.ones(3), 1 / 3)[1].tolist() == [True, False, True]
    # Layer-wise magnitude (the baseline) prunes the 2 smallest of the layer, both in row 1.
    assert Magnitude().prune(W, None, 1 / 3, None, None).keep.tolist() == [[True, True, True], [False, False, True]]


@pytest.mark.parametrize("sparsity,seed", [(0.5, 0), (0.5, 1), (0.7, 0), (0.3, 2)])
def test_sparsegpt_beats_wanda_and_magnitude_on_reconstruction_exact_sparsity(sparsity, seed):
    W, X = _layer(seed=seed)
    h = Hessian(X.shape[1])
    h.add(X)
    norms = InputNorms(X.shape[1])
    norms.add(X)
    W_s, keep_s, _ = sparsegpt(W, h.H, sparsity)
    keep_w = wanda_mask(W, norms.norms, sparsity)
    keep_m = Magnitude().prune(W, None, sparsity, None, None).keep
    e_s, e_w, e_m = _err(W, W_s, X), _err(W, W * keep_w, X), _err(W, W * keep_m, X)
    assert e_s < 0.95 * e_w and e_s < 0.95 * e_m, (e_s, e_w, e_m)  # measured margins: 8-20% below Wanda
    k = round(sparsity * W.numel())
    assert int((~keep_s).sum()) == k  # exactly the requested sparsity over the layer
    assert torch.all(W_s[~keep_s] == 0)
    per_row = round(sparsity * W.shape[1])
    assert torch.all((~keep_w).sum(dim=1) == per_row)  # Wanda: exactly per output row
    assert int((~keep_m).sum()) == k


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_patterns_exact_in_every_group_and_sparsegpt_best(pattern):
    nm = parse_pattern(pattern)
    W, X = _layer()
    h = Hessian(X.shape[1])
    h.add(X)
    norms = InputNorms(X.shape[1])
    norms.add(X)
    W_s, keep_s, _ = sparsegpt(W, h.H, nm.sparsity, nm.n, nm.m)
    keep_w = wanda_mask(W, norms.norms, nm.sparsity, nm)
    keep_m = Magnitude().prune(W, None, nm.sparsity, nm, None).keep
    for keep in (keep_s, keep_w, keep_m):
        assert torch.all(keep.reshape(W.shape[0], -1, nm.m).sum(dim=2) == nm.n)
    assert torch.all(W_s[~keep_s] == 0)
    e_s, e_w, e_m = _err(W, W_s, X), _err(W, W * keep_w, X), _err(W, W * keep_m, X)
    assert e_s < e_w and e_s < e_m, (e_s, e_w, e_m)


@pytest.mark.parametrize("pattern,blocksize", [(None, 128), (None, 16), ("2:4", 128), ("2:4", 8)])
def test_sparsegpt_loss_estimate_equals_the_true_reconstruction_error(pattern, blocksize):
    # The OBS bookkeeping: sum (w - q)^2 / [U_jj]^2 / 2 is exactly ||(W - W') X||^2 / n when H = 2 X X^T / n
    # (no dampening). Any slip in the Cholesky factor, the in-block or the lazy between-block updates breaks it.
    W, X = _layer(out=32, inp=64, n=1024)
    h = Hessian(X.shape[1])
    h.add(X)
    n, m = (2, 4) if pattern else (0, 0)
    W2, _, loss = sparsegpt(W, h.H.double(), 0.5, n, m, blocksize=blocksize, percdamp=0.0, dtype=torch.float64)
    true = float(((W.double() - W2) @ X.double().T).square().sum()) / X.shape[0]
    assert loss == pytest.approx(true, rel=1e-6)
    W3, _, loss32 = sparsegpt(W, h.H, 0.5, n, m, blocksize=blocksize, percdamp=0.0)  # float32, as used
    true32 = float(((W.double() - W3.double()) @ X.double().T).square().sum()) / X.shape[0]
    assert loss32 == pytest.approx(true32, rel=5e-3)


def test_sparsegpt_at_zero_sparsity_changes_nothing_and_handles_dead_inputs():
    W, X = _layer()
    X[:, 5] = 0.0  # an input that is never active
    h = Hessian(X.shape[1])
    h.add(X)
    W2, keep, loss = sparsegpt(W, h.H, 0.0)
    assert keep.all() and loss == 0.0
    expected = W.clone()
    expected[:, 5] = 0.0  # the reference zeroes weights of dead inputs: they never contribute
    torch.testing.assert_close(W2, expected)
    W3, keep3, _ = sparsegpt(W, h.H, 0.5)
    assert torch.isfinite(W3).all() and int((~keep3).sum()) == W.numel() // 2


def test_sparsegpt_leaves_the_callers_hessian_as_it_was_even_when_it_fails():
    # The Hessian is dampened in place (no (in, in) copy: streaming's peak memory) and restored on the way out.
    W, X = _layer()
    X[:, 5] = 0.0  # a dead input: its diagonal entry is set to 1 during the call
    h = Hessian(X.shape[1])
    h.add(X)
    H = h.H
    before = H.clone()
    W2, keep, _ = sparsegpt(W, H, 0.5)
    assert torch.equal(H, before)
    again, keep_again, _ = sparsegpt(W, H, 0.5)  # a second call on the same matrix: the same result, bit for bit
    assert torch.equal(again, W2) and torch.equal(keep_again, keep)
    indefinite = -torch.eye(X.shape[1])  # no dampening makes it positive definite: the call raises
    untouched = indefinite.clone()
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt(W, indefinite, 0.5)
    assert torch.equal(indefinite, untouched)


def test_existing_masks_stay_pruned_in_every_method():
    W, X = _layer()
    h = Hessian(X.shape[1])
    h.add(X)
    norms = InputNorms(X.shape[1])
    norms.add(X)
    kept = torch.ones_like(W, dtype=torch.bool)
    kept[:, 10:14] = False
    kept[3, :] = False
    for method, stats in (("sparsegpt", h), ("wanda", norms), ("magnitude", None)):
        for pattern in (None, parse_pattern("2:4")):
            result = get_method(method).prune(W.clone(), stats if method != "sparsegpt" else _copy(h), 0.5, pattern,
                                              kept)
            assert not result.keep[~kept].any(), (method, pattern)
            if result.weight is not None:
                assert torch.all(result.weight[~result.keep] == 0)


def _copy(h):
    c = Hessian(h.H.shape[0])
    c.H = h.H.clone()
    c.tokens = h.tokens
    return c


def test_nm_keep_ties_keep_the_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 3.0, 0.0]])
    assert parse_pattern("2:4").keep_best(scores).tolist() == [[True, True, False, False, True, False, True, False]]


def test_registry_names_options_and_errors():
    assert set(LLM_METHODS.names()) == {"magnitude", "sparsegpt", "wanda"}
    assert isinstance(get_method("sparsegpt", blocksize=64), SparseGPT)
    assert isinstance(get_method("wanda"), Wanda)
    with pytest.raises(ValueError, match="did you mean 'wanda'"):
        get_method("wandda")
    with pytest.raises(ValueError, match="'wanda' has no option 'blocksize'"):
        get_method("wanda", blocksize=64)
    with pytest.raises(ValueError, match="blocksize must be a positive integer"):
        get_method("sparsegpt", blocksize=0)
    with pytest.raises(ValueError, match="N:M string"):
        parse_pattern("element")
    W, X = _layer(inp=60)
    h = Hessian(60)
    h.add(X)
    with pytest.raises(ValueError, match="not divisible by M=8"):
        sparsegpt(W, h.H, 0.5, 4, 8)
