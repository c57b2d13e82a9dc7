"""Han et al.'s rule (method="han", scope="threshold"): prune exactly where |w| < q * std(layer)."""

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.criteria.threshold import HanThreshold

torch.set_num_threads(1)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 7))


@pytest.mark.parametrize("quality", [0.5, 1.0, 1.7])
def test_mask_is_han_rule(quality):
    model = _model()
    expected = {}
    for name in ("0", "2"):
        w = getattr(model, name).weight.detach().numpy()
        expected[name] = ~(np.abs(w) < quality * np.std(w))  # numpy's std: the population std
    report = pk.prune(model, method=HanThreshold(quality), scope="threshold")
    for name in ("0", "2"):
        assert np.array_equal(pk.masks(model)[f"{name}.weight"].numpy(), expected[name])
    assert report.target_sparsity is None
    assert 0 < report.sparsity < 1


def test_quality_by_name_defaults_to_one_and_repeats_on_what_is_left():
    model = _model(1)
    w = model[0].weight.detach().clone()
    pk.prune(model, method="han", scope="threshold")
    first = pk.masks(model)["0.weight"].clone()
    assert torch.equal(first, ~(w.abs() < w.std(unbiased=False)))
    pk.prune(model, method="han", scope="threshold")  # a second cycle: the std of the survivors
    kept = w[first]
    assert torch.equal(pk.masks(model)["0.weight"], first & ~(w.abs() < kept.std(unbiased=False)))


def test_threshold_respects_the_cap_and_bad_quality_raises():
    model = _model()
    pk.prune(model, method=HanThreshold(5.0), scope="threshold", max_layer_sparsity=0.5)
    assert all(abs(v - 0.5) < 0.01 for k, v in pk.sparsity(model, per_layer=True).items() if "weight" in k)
    with pytest.raises(ValueError, match="quality"):
        HanThreshold(0)
    with pytest.raises(ValueError, match="sparsity is required"):
        pk.prune(_model(), method="han")  # the global scope needs a sparsity; the threshold scope does not


def test_recipe_accepts_han_without_sparsity():
    from prunekit.recipes import RecipeError, parse_recipe

    raw = {"model": {"builtin": "tinymlp"}, "data": {"name": "digits"}, "prune": {"method": "han", "scope": "threshold"}}
    assert parse_recipe(raw).prune.sparsity is None
    with pytest.raises(RecipeError, match="sparsity"):
        parse_recipe({**raw, "prune": {"method": "han", "scope": "global"}})


def test_pruner_repeats_han_rule_on_its_prune_steps():
    model = _model(2)
    w = model[2].weight.detach().clone()
    pruner = pk.Pruner(model, pk.schedules.Iterative(0.9, steps=2, every=1), method="han", scope="threshold")
    pruner.step()
    pruner.step()
    first = ~(w.abs() < w.std(unbiased=False))
    second = first & ~(w.abs() < w[first].std(unbiased=False))
    assert torch.equal(pk.masks(model)["2.weight"], second)
