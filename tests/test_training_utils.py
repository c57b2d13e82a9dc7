"""Han et al.'s retraining helpers: dropout rescaled to the remaining connections, frozen layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.models import LeNet5
from prunekit.training import freeze, rescale_dropout, unfreeze


def _mlp():
    return nn.Sequential(
        nn.Linear(64, 100), nn.ReLU(), nn.Dropout(0.5), nn.Linear(100, 50), nn.ReLU(), nn.Dropout(0.4), nn.Linear(50, 10)
    )


def test_dropout_is_rescaled_by_the_square_root_of_the_remaining_connections():
    model = _mlp()
    pk.prune(model, scope={"0": 0.84, "3": 0.36}, targets=["0", "3"])
    rates = rescale_dropout(model)
    # D_r = D_o sqrt(C_r / C_o): layer 0 keeps 16% of its weights, layer 3 keeps 64%
    assert rates == pytest.approx({"2": 0.5 * math.sqrt(0.16), "5": 0.4 * math.sqrt(0.64)}, rel=1e-3)
    assert model[2].p == pytest.approx(0.2, rel=1e-3)
    pk.prune(model, scope={"0": 0.96}, targets=["0"])  # more pruning: rescaled from D_o, not compounded
    assert rescale_dropout(model)["2"] == pytest.approx(0.5 * math.sqrt(0.04), rel=1e-3)


def test_dropout_pairs_can_be_given_and_are_checked():
    model = _mlp()
    pk.prune(model, scope={"6": 0.75}, targets=["6"])
    assert rescale_dropout(model, {"5": "6"}) == pytest.approx({"5": 0.2})
    with pytest.raises(ValueError, match="not a dropout"):
        rescale_dropout(model, {"3": "6"})
    with pytest.raises(ValueError, match="not a Linear or convolution"):
        rescale_dropout(model, {"5": "4"})


def test_freeze_keeps_convolutions_fixed_while_fully_connected_layers_retrain():
    model = LeNet5()
    pk.prune(model, 0.5)
    frozen = freeze(model)
    assert sorted(frozen) == ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight"]
    conv = model.conv1.weight.detach().clone()
    fc = model.fc1.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    assert torch.equal(model.conv1.weight, conv)
    assert not torch.equal(model.fc1.weight, fc)
    with pytest.raises(ValueError, match="frozen"):
        pk.prune(model, 0.8)  # frozen layers are refused by name ...
    pk.prune(model, 0.8, exclude=["conv1", "conv2"])  # ... or excluded
    assert sorted(unfreeze(model, "conv*")) == sorted(frozen)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="matches no module"):
        freeze(model, "classifier")
