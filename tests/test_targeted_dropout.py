"""Targeted dropout: which entries are targeted, how often they drop, and the pruning it prepares."""

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.regularizers import TargetedDropout
from prunekit.regularizers.targeted_dropout import targeted_mask

torch.set_num_threads(1)


def test_targeted_mask_by_hand():
    w = torch.tensor([[0.1, -3.0, 0.2, 4.0], [5.0, -0.05, 1.0, 0.3], [0.0, 0.0, 2.0, -2.0]])
    assert torch.equal(targeted_mask(w, 0.5), torch.tensor([[True, False, True, False], [False, True, False, True],
                                                            [True, True, False, False]]))
    # unit mode: the lowest-norm third of the units (norms 5.0, 5.1, 2.8): the last row, whole
    assert torch.equal(targeted_mask(w, 0.34, "unit"), torch.tensor([[False] * 4, [False] * 4, [True] * 4]))


def test_training_drops_only_targeted_weights_at_rate_alpha_and_eval_is_identity():
    torch.manual_seed(0)
    layer = nn.Linear(40, 50)
    w = layer.weight.detach().clone()
    td = TargetedDropout(layer, targeted=0.5, rate=0.3)
    target = targeted_mask(w, 0.5)
    layer.train()
    drops = torch.stack([layer.weight.detach() == 0 for _ in range(200)]).float().mean(0)
    assert drops[~target].max() == 0  # untargeted weights never drop
    assert drops[target].mean() == pytest.approx(0.3, abs=0.02)
    layer.eval()
    assert torch.equal(layer.weight, w)
    td.to_masks()
    assert torch.equal(pk.masks(layer)["weight"], ~target)


@pytest.mark.slow
def test_targeted_dropout_makes_pruning_cheap_on_digits():
    from prunekit.data import digits, evaluate, loaders, train
    from prunekit.models import LeNet300100

    train_set, test_set = digits()
    results = []
    for prepare in (False, True):
        train_loader, test_loader = loaders(train_set, test_set, seed=0)
        torch.manual_seed(0)
        model = LeNet300100()
        td = TargetedDropout(model, targeted=0.75, rate=0.5)
        if not prepare:
            td.remove()
        train(model, train_loader, epochs=10)
        if prepare:
            td.remove()
        TargetedDropout(model, targeted=0.75).to_masks()  # prune the same 75% of every unit
        results.append(evaluate(model, test_loader))
    assert results[1] > results[0] + 0.1


def test_unit_mode_drops_whole_low_norm_units():
    torch.manual_seed(0)
    layer = nn.Linear(6, 10)
    w = layer.weight.detach().clone()
    TargetedDropout(layer, targeted=0.3, rate=1.0, mode="unit")
    layer.train()
    dropped = (layer.weight.detach() == 0).all(dim=1)
    assert torch.equal(dropped, targeted_mask(w, 0.3, "unit").all(dim=1)) and int(dropped.sum()) == 3
    with pytest.raises(ValueError, match="mode"):
        TargetedDropout(nn.Linear(2, 2), mode="column")
