"""``masking.set_mask``: masks that may loosen (dynamic sparse training), with stored values kept honest."""

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.masking import attach, get_mask, set_mask


def test_set_mask_replaces_the_mask_and_zeroes_everything_not_kept_before_and_after():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    model = nn.Sequential(layer)
    attach(model, "0.weight", torch.tensor([[True, True], [False, True]]))
    with torch.no_grad():  # an optimizer may move a masked entry's stored value
        layer.parametrizations.weight.original[1, 0] = 7.0
    new = set_mask(model, "0.weight", torch.tensor([[True, False], [True, True]]))
    assert new.tolist() == [[True, False], [True, True]]
    assert get_mask(model, "0.weight") is new  # replaced in place: the same buffer
    # kept in both: value stays; dropped: 0; regrown: starts at 0 (not the stale 7.0)
    assert layer.parametrizations.weight.original.tolist() == [[1.0, 0.0], [0.0, 4.0]]
    assert pk.sparsity(model) == pytest.approx(0.25)


def test_set_mask_attaches_when_there_is_none_and_checks_the_shape():
    model = nn.Sequential(nn.Linear(3, 2))
    set_mask(model, "0.weight", torch.tensor([[True, False, True], [True, True, False]]))
    assert pk.masks(model)["0.weight"].sum() == 4
    with pytest.raises(ValueError, match="does not fit"):
        set_mask(model, "0.weight", torch.ones(3, 2, dtype=torch.bool))


def test_set_mask_on_tied_weights_changes_every_owner():
    a, b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    attach(model, "0.weight", torch.tensor([[True, False], [True, True]]))
    set_mask(model, "1.weight", torch.tensor([[False, True], [True, True]]))
    assert model[0].weight.detach()[0, 0] == 0 and model[1].weight.detach()[0, 0] == 0
    assert torch.equal(model[0].weight, model[1].weight)
