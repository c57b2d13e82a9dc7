"""Every failed pruning call leaves the model exactly as it was; numbers of any numeric type are accepted."""

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return pk.masks(model) == {} and set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_zero_size_parameter_is_skipped_not_a_zero_division():
    model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 4), nn.Linear(4, 4))
    report = pk.prune(model, 0.5)
    assert set(pk.masks(model)) == {"2.weight"}
    assert report.sparsity == 0.5 and [l.name for l in report.layers] == ["2.weight"]
    empty = nn.Sequential(nn.Linear(8, 0))
    before = snapshot(empty)
    with pytest.raises(ValueError, match="every target is empty"):
        pk.prune(empty, 0.5)
    assert unchanged(empty, before)


def test_meta_device_model_gets_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="0.weight, 0.bias, 1.weight and 1 more on the meta device: there are no weights to prune"):
        pk.prune(model, 0.5)
    with pytest.raises(ValueError, match="on the meta device"):
        pk.Pruner(model, pk.schedules.OneShot(0.5))
    with pytest.raises(ValueError, match="on the meta device"):
        pk.structured.prune(model, torch.randn(1, 8), ratio=0.5)
    with pytest.raises(ValueError, match="on the meta device"):
        pk.structured.StructuredSpec(model, torch.randn(1, 8))
    with pytest.raises(ValueError, match="on the meta device"):
        pk.llm.prune(model, torch.zeros(1, 4, dtype=torch.long), method="magnitude")
    assert pk.masks(model) == {}


def test_failed_n_m_leaves_no_mask():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3))  # the second layer's 6 inputs do not fit 2:4
    before = snapshot(model)
    with pytest.raises(ValueError, match="1.weight has size 6, not divisible by M=4"):
        pk.prune(model, granularity="2:4")
    assert unchanged(model, before)


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5]), 0.5])
def test_sparsity_of_any_numeric_type(value):
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    assert pk.prune(model, value).sparsity == 0.5


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor([0.1, 0.2]), "0.5", None])
def test_non_numbers_are_refused_before_any_change(value):
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    before = snapshot(model)
    with pytest.raises((TypeError, ValueError), match="sparsity"):
        pk.prune(model, value)
    assert unchanged(model, before)


def test_prune_needs_a_module():
    with pytest.raises(TypeError, match="prunekit needs a torch nn.Module to prune; got str"):
        pk.prune("x", 0.5)
