"""Greedy per-layer allocation under a FLOPs budget (pk.allocation.greedy_allocation)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.allocation import greedy_allocation

torch.set_num_threads(1)


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(2)]
    return model, data


FLOPS = {"0.weight": 160, "2.weight": 192, "4.weight": 36}  # in x out multiply-adds per sample


def _loss(model, data):
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)


def test_first_move_is_the_least_loss_per_flop():
    model, data = _case()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = _loss(model, data)
    rates = {}
    for name, flops in FLOPS.items():  # the reference rule, by hand: each layer 5% sparser in turn
        trial = copy.deepcopy(model)
        pk.prune(trial, scope={name: 0.05})
        rates[name] = (_loss(trial, data) - base) / (0.05 * flops)
    eligible = {n: r for n, r in rates.items() if 0.05 * FLOPS[n] >= 0.001 * sum(FLOPS.values())}
    ratios = greedy_allocation(model, 0.999, data)
    best = min(eligible, key=eligible.get)
    assert ratios == {n: (0.05 if n == best else 0.0) for n in FLOPS}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not pk.masks(model)


def test_budget_is_met_and_usable_as_a_scope():
    model, data = _case()
    ratios = greedy_allocation(model, 0.3, data, step=0.1)
    cost = sum(FLOPS[n] * (1 - s) for n, s in ratios.items())
    assert 0.3 * sum(FLOPS.values()) - 0.1 * max(FLOPS.values()) <= cost <= 0.3 * sum(FLOPS.values())
    pk.prune(model, scope=ratios)
    for name, s in ratios.items():
        assert pk.sparsity(model, per_layer=True)[name] == pytest.approx(s, abs=0.02)


def test_custom_cost_and_errors():
    model, data = _case()
    only_last = lambda r: 36 * (1 - r["4.weight"])  # noqa: E731  a cost that only the last layer moves
    ratios = greedy_allocation(model, 0.5, data, cost=only_last)
    assert ratios["0.weight"] == ratios["2.weight"] == 0.0 and ratios["4.weight"] >= 0.5
    with pytest.raises(ValueError, match="budget"):
        greedy_allocation(model, 1.5, data)
    with pytest.raises(ValueError, match="data-free"):
        greedy_allocation(model, 0.5, data, method="taylor")
