"""Quality options of ``pk.llm.prune``: true sequential pruning, OWL / sensitivity allocation, recovery."""

import pytest
import torch

import prunekit as pk
from prunekit import masking
from prunekit.llm.allocation import outlier_ratio, scores_to_sparsities
from prunekit.llm.methods import LayerMethod, LayerResult
from prunekit.llm.models import tiny_model
from prunekit.llm.recovery import least_squares_refine
from prunekit.llm.wanda import InputNorms, wanda_mask


def test_owl_mapping_is_the_papers_min_max_rule():
    # scores 1, 2, 3 -> densities 0, 0.1, 0.2 (width 2 * 0.1), shifted to mean 1 - 0.6 -> 0.3, 0.4, 0.5
    assert scores_to_sparsities([1.0, 2.0, 3.0], 0.6, 0.1) == pytest.approx([0.7, 0.6, 0.5])
    # weighted by block size: the mean sparsity over weights stays the target
    out = scores_to_sparsities([1.0, 3.0], 0.5, 0.1, weights=[3.0, 1.0])
    assert out[0] - out[1] == pytest.approx(0.2)
    assert (3 * out[0] + out[1]) / 4 == pytest.approx(0.5)
    assert scores_to_sparsities([2.0, 2.0], 0.5, 0.1) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="allocation_range"):
        scores_to_sparsities([0.0, 1.0], 0.95, 0.08)


def test_outlier_ratio_by_hand():
    scores = [torch.tensor([[1.0, 1.0, 1.0, 1.0, 16.0]])]  # mean 4: only 16 is above 2 * 4
    assert outlier_ratio(scores, 2.0) == pytest.approx(1 / 5)
    assert outlier_ratio(scores, 5.0) == 0.0
    # all scores of a block count together: one outlier among 1 + 5 scores
    assert outlier_ratio([torch.ones(1, 4), torch.tensor([[1.0, 50.0]])], 5.0) == pytest.approx(1 / 6)


@pytest.mark.parametrize("allocation", ["owl", "sensitivity"])
def test_allocations_keep_the_target_and_differ_per_block(allocation):
    model = tiny_model("llama", num_hidden_layers=3)
    calib = pk.llm.random_calibration(256, 4, 24)
    report = pk.llm.prune(model, calib, method="wanda", sparsity=0.6, allocation=allocation, allocation_range=0.1)
    assert len(report.block_sparsity) == 3 and len(set(report.block_sparsity)) > 1
    assert max(report.block_sparsity) - min(report.block_sparsity) == pytest.approx(0.2)
    assert sum(report.block_sparsity) / 3 == pytest.approx(0.6)
    assert pk.sparsity(model) == pytest.approx(0.6, abs=2e-3)  # per-row rounding only
    name = "model.layers.{}.mlp.up_proj.weight"
    for i, s in enumerate(report.block_sparsity):
        mask = masking.get_mask(model, name.format(i))
        assert 1 - mask.float().mean().item() == pytest.approx(s, abs=1 / 64)


def test_explicit_per_block_sparsities():
    model = tiny_model("llama", num_hidden_layers=2)
    pk.llm.prune(model, pk.llm.random_calibration(256, 2, 16), method="wanda", allocation=[0.25, 0.75])
    assert 1 - masking.get_mask(model, "model.layers.0.self_attn.q_proj.weight").float().mean() == pytest.approx(0.25)
    assert 1 - masking.get_mask(model, "model.layers.1.self_attn.q_proj.weight").float().mean() == pytest.approx(0.75)


@pytest.mark.parametrize("kwargs, message", [
    (dict(allocation="outliers"), "allocation must be one of"),
    (dict(allocation=[0.5]), "1 sparsities for 2 blocks"),
    (dict(allocation="owl", pattern="2:4", sparsity=None), "N:M pattern"),
    (dict(allocation="owl", allocation_range=0.6), "leaves"),
    (dict(sequential="true"), "sequential must be one of"),
    (dict(recovery="dsnot"), "recovery must be"),
    (dict(recovery="lsq", recovery_steps=0), "recovery_steps"),
])
def test_bad_options_fail_before_any_change(kwargs, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs.setdefault("sparsity", 0.5)
    with pytest.raises(ValueError, match=message):
        pk.llm.prune(model, pk.llm.random_calibration(256, 2, 16), method="wanda", **kwargs)
    assert not masking.masks(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _Recorder(LayerMethod):
    """Wanda that keeps every layer's input norms."""

    name = "recorder"

    def __init__(self):
        self.norms = {}

    def statistics(self, in_features, device):
        return InputNorms(in_features, device)

    def prune(self, weight, stats, sparsity, pattern, kept):
        self.norms[len(self.norms)] = stats.norms.clone()
        return LayerResult(wanda_mask(weight, stats.norms, sparsity))


@pytest.mark.parametrize("mode", ["block", "layer"])
def test_true_sequential_calibrates_down_proj_on_the_pruned_layers_before_it(mode):
    model = tiny_model("llama", num_hidden_layers=1)
    dense = tiny_model("llama", num_hidden_layers=1)
    calib = pk.llm.random_calibration(256, 4, 24)
    spy = _Recorder()
    pk.llm.prune(model, calib, method=spy, sparsity=0.5, sequential=mode)
    # layers in call order: q, k, v share one accumulator; o; gate/up share one; down last
    recorded_down = spy.norms[len(spy.norms) - 1]

    def down_input_norms(net):
        seen = []
        handle = net.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            net(calib, use_cache=False)
        handle.remove()
        x = torch.cat(seen).reshape(-1, seen[0].shape[-1])
        return x.square().sum(0, dtype=torch.float64).sqrt().float()

    pruned_norms, dense_norms = down_input_norms(model), down_input_norms(dense)
    expected, other = (pruned_norms, dense_norms) if mode == "layer" else (dense_norms, pruned_norms)
    torch.testing.assert_close(recorded_down, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(recorded_down, other, rtol=1e-3)


def test_least_squares_refine_reaches_the_exact_solution_on_the_mask():
    torch.manual_seed(0)
    W = torch.randn(6, 32, dtype=torch.float64)
    X = torch.randn(32, 200, dtype=torch.float64) * torch.linspace(0.2, 2, 32, dtype=torch.float64)[:, None]
    H = 2 * X @ X.T / 200
    keep = torch.rand(6, 32) > 0.5
    start = W * keep
    new, before, after = least_squares_refine(W, start, keep, H, steps=40, percdamp=0.0)
    assert torch.equal(new[~keep], torch.zeros(int((~keep).sum()), dtype=torch.float64))
    for r in range(6):  # per row: w'_K = H_KK^-1 H_K: w
        K = keep[r]
        exact = torch.linalg.solve(H[K][:, K], H[K] @ W[r])
        torch.testing.assert_close(new[r, K], exact, rtol=1e-6, atol=1e-8)
    D = W - new
    assert after == pytest.approx(float(((D @ H) * D).sum()))
    assert after < before


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_recovery_keeps_the_mask_and_lowers_the_layer_error(method):
    calib = pk.llm.random_calibration(256, 4, 24)
    plain, recovered = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    a = pk.llm.prune(plain, calib, method=method, sparsity=0.6)
    b = pk.llm.prune(recovered, calib, method=method, sparsity=0.6, recovery="lsq")
    masks_a, masks_b = masking.masks(plain), masking.masks(recovered)
    for name in masks_a:  # block 0 sees the same inputs in both runs: the same masks
        if name.startswith("model.layers.0."):
            assert torch.equal(masks_a[name], masks_b[name]), name
    assert pk.sparsity(recovered) == pk.sparsity(plain)
    for name in masks_b:  # pruned weights stay exactly zero
        assert not masking.raw_parameter(recovered.get_submodule(name.rsplit(".", 1)[0]), "weight")[~masks_b[name]].any()
    first = "model.layers.0.self_attn.q_proj.weight"
    assert b.layer_errors[first] < (a.layer_errors.get(first, float("inf")))


def test_block_scores_restore_the_weights_and_measure_the_pruned_blocks_error():
    from prunekit.llm.allocation import block_scores
    from prunekit.llm.sequential import as_batches, gather_layers

    model = tiny_model("llama", num_hidden_layers=2)
    calib = pk.llm.random_calibration(256, 4, 24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name, blocks = pk.llm.find_blocks(model)
    scores = block_scores(model, blocks, gather_layers(name, blocks), as_batches(calib), 0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # block 0 by hand: its output with Wanda's 50% masks vs the dense output, on the embeddings
    pruned = tiny_model("llama", num_hidden_layers=2)
    pk.llm.prune(pruned, calib, method="wanda", sparsity=0.5, exclude="model.layers.1")
    outs = {}
    for key, net in (("dense", model), ("pruned", pruned)):
        handle = net.model.layers[0].register_forward_hook(
            lambda m, a, o, key=key: outs.setdefault(key, o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            net(calib, use_cache=False)
        handle.remove()
    expected = float((outs["pruned"] - outs["dense"]).square().sum() / outs["dense"].square().sum())
    assert scores["sensitivity"][0] == pytest.approx(expected, rel=1e-4)
