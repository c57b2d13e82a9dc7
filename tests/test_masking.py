"""Masks: exact zeros forward and backward, survival of optimizers, deepcopy, state_dict, compile, interop."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunekit as pk
from prunekit import masking


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def random_mask(shape, keep=0.5, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < keep


def test_masked_entries_are_zero_in_forward_and_backward():
    model = mlp()
    mask = random_mask((16, 8))
    masking.attach(model, "0.weight", mask)
    assert (model[0].weight[~mask] == 0).all()
    model(torch.randn(5, 8)).sum().backward()
    grad = masking.raw_parameter(model[0], "weight").grad
    assert (grad[~mask] == 0).all()
    assert grad[mask].abs().sum() > 0


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
)
def test_pruned_weights_stay_zero_through_optimizer_steps(make_opt):
    model = mlp()
    opt = make_opt(model.parameters())
    # build optimizer state (momentum, Adam moments) before pruning, the hard case
    for _ in range(3):
        model(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    mask = random_mask((16, 8), 0.3)
    masking.attach(model, "0.weight", mask)
    for _ in range(5):
        model(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert (model[0].weight[~mask] == 0).all()
    pk.finalize(model)
    assert (model[0].weight[~mask] == 0).all()
    assert type(model[0]) is nn.Linear


def test_attach_only_tightens():
    model = mlp()
    first = random_mask((16, 8), seed=1)
    second = random_mask((16, 8), seed=2)
    masking.attach(model, "0.weight", first)
    result = masking.attach(model, "0.weight", second)
    assert torch.equal(result, first & second)


def test_attach_rejects_wrong_shape_and_integer_parameters():
    model = mlp()
    with pytest.raises(ValueError, match=r"0.weight: mask shape \(8, 16\) does not fit"):
        masking.attach(model, "0.weight", torch.ones(8, 16, dtype=torch.bool))
    model[0].register_parameter("count", nn.Parameter(torch.ones(3, dtype=torch.long), requires_grad=False))
    with pytest.raises(TypeError, match="floating-point"):
        masking.attach(model, "0.count", torch.ones(3, dtype=torch.bool))
    assert masking.masks(model) == {}


def test_any_floating_parameter_can_be_masked():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    mask = torch.tensor([True, False, True, False])
    masking.attach(model, "1.weight", mask)
    masking.attach(model, "0.bias", mask)
    assert set(pk.masks(model)) == {"1.weight", "0.bias"}
    assert (model[1].weight[~mask] == 0).all() and (model[0].bias[~mask] == 0).all()


def test_deepcopy_keeps_masks_and_copies_are_independent():
    model = mlp()
    mask = random_mask((16, 8))
    masking.attach(model, "0.weight", mask)
    clone = copy.deepcopy(model)
    assert torch.equal(pk.masks(clone)["0.weight"], mask)
    pk.finalize(model)  # must not break the copy (torch shares the injected class)
    x = torch.randn(3, 8)
    assert torch.allclose(clone(x), model(x))
    masking.attach(clone, "2.bias", torch.zeros(4, dtype=torch.bool))
    assert (clone[2].bias == 0).all() and not (model[2].bias == 0).all()


def test_state_dict_round_trip_into_masked_and_fresh_models():
    model = mlp()
    mask = random_mask((16, 8))
    masking.attach(model, "0.weight", mask)
    state = model.state_dict()
    fresh = mlp()
    masking.load_masked_state_dict(fresh, state)
    assert torch.equal(pk.masks(fresh)["0.weight"], mask)
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    assert torch.equal(other(x), model(x))


@pytest.mark.slow
def test_torch_compile_sees_the_mask():
    model = mlp()
    mask = random_mask((16, 8))
    masking.attach(model, "0.weight", mask)
    compiled = torch.compile(model)
    x = torch.randn(3, 8)
    assert torch.allclose(compiled(x), model(x), atol=1e-6)


def test_tied_weights_share_one_mask():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    model[2].weight = model[0].weight
    mask = random_mask((6, 6))
    masking.attach(model, "2.weight", mask)
    assert list(pk.masks(model)) == ["0.weight"]
    assert torch.equal(model[0].weight, model[2].weight)
    assert (model[2].weight[~mask] == 0).all()
    clone = copy.deepcopy(model)
    assert clone[0].parametrizations.weight[0] is clone[2].parametrizations.weight[0]
    pk.finalize(model)
    assert model[0].weight is model[2].weight


def test_sparsity_overall_and_per_layer():
    model = mlp()
    masking.attach(model, "0.weight", torch.arange(128).reshape(16, 8) < 32)  # 75% pruned
    masking.attach(model, "2.weight", torch.ones(4, 16, dtype=torch.bool))  # 0% pruned
    assert pk.sparsity(model, per_layer=True) == {"0.weight": 0.75, "2.weight": 0.0}
    assert pk.sparsity(model) == pytest.approx(96 / 192)


def test_interop_from_and_to_torch_prune():
    model = mlp()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.6)
    torch_prune.random_unstructured(model[2], "weight", amount=0.3)
    expected = {"0.weight": model[0].weight_mask.bool().clone(), "2.weight": model[2].weight_mask.bool().clone()}
    x = torch.randn(4, 8)
    before = model(x)
    pk.from_torch_prune(model)
    assert not hasattr(model[0], "weight_orig")
    for name, mask in expected.items():
        assert torch.equal(pk.masks(model)[name], mask)
    assert torch.allclose(model(x), before)
    pk.to_torch_prune(model)
    assert pk.masks(model) == {}
    assert torch.equal(model[0].weight_mask.bool(), expected["0.weight"])
    assert torch.allclose(model(x), before)
    # torch's own machinery still works on the converted model
    torch_prune.remove(model[0], "weight")
    assert (model[0].weight[~expected["0.weight"]] == 0).all()


def test_to_torch_prune_refuses_tied_weights():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    model[1].weight = model[0].weight
    masking.attach(model, "0.weight", random_mask((6, 6)))
    with pytest.raises(ValueError, match="tied"):
        pk.to_torch_prune(model)
    assert "0.weight" in pk.masks(model)


def test_pruning_a_torch_pruned_model_asks_for_conversion_first():
    model = mlp()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match="0 is pruned with torch.nn.utils.prune; convert it first"):
        pk.prune(model, 0.8)
    pk.from_torch_prune(model)
    pk.prune(model, 0.8, max_layer_sparsity=0.99)
    assert pk.sparsity(model) == round(0.8 * 192) / 192
