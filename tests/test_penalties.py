"""Penalties: values and gradients against their formulas on hand-made weights, proximal steps that really
are proximal operators, pruning by threshold."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.data import synthetic_classification
from prunekit.regularizers import (
    L1,
    L2,
    PENALTIES,
    ElasticNet,
    GroupLasso,
    SparseGroupLasso,
    get_penalty,
    soft_threshold,
)

W = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -4.0]])
LAM = 0.1


def _model(weight=W):
    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    return model


def _grad(penalty, model):
    model.zero_grad()
    penalty().backward()
    return model[0].weight.grad.clone()


def test_l1_value_and_gradient():
    model = _model()
    penalty = L1(model, LAM)
    assert penalty().item() == pytest.approx(LAM * 10.5)
    torch.testing.assert_close(_grad(penalty, model), LAM * torch.tensor([[1.0, -1.0, 1.0], [0.0, 1.0, -1.0]]))


def test_l2_value_and_gradient():
    model = _model()
    penalty = L2(model, LAM)
    assert penalty().item() == pytest.approx(LAM * 0.5 * (1 + 4 + 0.25 + 9 + 16))
    torch.testing.assert_close(_grad(penalty, model), LAM * W)


def test_elastic_net_value_and_gradient():
    model = _model()
    penalty = ElasticNet(model, LAM, l1_ratio=0.3)
    assert penalty().item() == pytest.approx(LAM * (0.3 * 10.5 + 0.7 * 0.5 * 30.25))
    torch.testing.assert_close(_grad(penalty, model), LAM * (0.3 * W.sign() + 0.7 * W))


def test_group_lasso_over_neurons_value_and_gradient():
    model = _model()
    penalty = GroupLasso(model, LAM, groups="neuron")  # rows: output neurons, p_g = 3
    norms = torch.tensor([math.sqrt(5.25), 5.0])
    assert penalty().item() == pytest.approx(LAM * math.sqrt(3) * float(norms.sum()))
    expected = LAM * math.sqrt(3) * W / norms[:, None]
    torch.testing.assert_close(_grad(penalty, model), expected)
    unweighted = GroupLasso(model, LAM, groups="channel", size_weighted=False)
    torch.testing.assert_close(_grad(unweighted, model), LAM * W / norms[:, None])


def test_group_lasso_over_input_columns_and_conv_filters():
    model = _model()
    penalty = GroupLasso(model, LAM, groups="column")  # columns, p_g = 2
    norms = W.norm(dim=0)
    torch.testing.assert_close(_grad(penalty, model), LAM * math.sqrt(2) * W / norms[None, :])

    conv = nn.Sequential(nn.Conv2d(2, 3, 2, bias=False))
    penalty = GroupLasso(conv, LAM, groups="filter")  # p_g = 2 * 2 * 2 = 8
    weight = conv[0].weight
    conv.zero_grad()
    penalty().backward()
    filters = weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(weight.grad, LAM * math.sqrt(8) * weight.detach() / filters[:, None, None, None])


def test_sparse_group_lasso_value_and_gradient():
    model = _model()
    penalty = SparseGroupLasso(model, LAM, l1_ratio=0.25, groups="neuron")
    norms = torch.tensor([math.sqrt(5.25), 5.0])
    value = LAM * (0.25 * 10.5 + 0.75 * math.sqrt(3) * float(norms.sum()))
    assert penalty().item() == pytest.approx(value)
    expected = LAM * (0.25 * W.sign() + 0.75 * math.sqrt(3) * W / norms[:, None])
    torch.testing.assert_close(_grad(penalty, model), expected)


def test_group_gradient_at_a_zero_group_is_zero_not_nan():
    model = _model(torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]]))
    grad = _grad(GroupLasso(model, LAM), model)
    assert torch.isfinite(grad).all() and grad[0].abs().sum() == 0


def test_masked_weights_contribute_nothing():
    model = _model()
    pk.prune(model, 0.5, scope="local")  # keeps -2, 3, -4
    penalty = L1(model, 1.0)
    assert penalty().item() == pytest.approx(9.0)
    model.zero_grad()
    penalty().backward()
    grad = model[0].parametrizations.weight.original.grad
    assert grad[~pk.masks(model)["0.weight"]].abs().sum() == 0


def test_proximal_steps_match_their_closed_forms():
    t = 0.5
    v = torch.tensor([[1.0, -0.2, 0.5], [0.0, 3.0, -0.4]])
    cases = [
        (L1, {}, soft_threshold(v, t)),
        (L2, {}, v / (1 + t)),
        (ElasticNet, dict(l1_ratio=0.4), soft_threshold(v, 0.2) / (1 + 0.3)),
    ]
    for cls, kwargs, expected in cases:
        model = _model(v)
        cls(model, 1.0, **kwargs).proximal_step(lr=t)
        torch.testing.assert_close(model[0].weight.detach(), expected)
    # group: w_g * max(0, 1 - t sqrt(3) / ||w_g||); with t = 0.7 the first row (norm 1.136) goes entirely
    t = 0.7
    model = _model(v)
    GroupLasso(model, 1.0).proximal_step(lr=t)
    norms = v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model[0].weight.detach(), v * (1 - t * math.sqrt(3) / norms).clamp_min(0))
    assert model[0].weight[0].abs().sum() == 0


def test_every_proximal_step_minimises_its_objective():
    """prox_t(v) = argmin_x t f(x) + 1/2 ||x - v||^2: random perturbations never do better."""
    torch.manual_seed(0)
    v = torch.randn(4, 6)
    t = 0.3
    for name in PENALTIES.names():
        model = _model(v)
        penalty = get_penalty(name, model, strength=1.0)
        penalty.proximal_step(lr=t)
        x = model[0].weight.detach().clone()

        def objective(candidate):
            with torch.no_grad():
                model[0].weight.copy_(candidate)
                return (t * penalty() + 0.5 * (candidate - v).square().sum()).item()

        best = objective(x)
        for _ in range(200):
            assert objective(x + 1e-2 * torch.randn_like(x)) >= best - 1e-6, name


def test_prune_by_threshold_elements_and_groups():
    model = _model(torch.tensor([[0.1, -2.0, 0.05], [0.01, 0.02, -0.03]]))
    report = L1(model, LAM).prune(threshold=0.06)
    assert pk.masks(model)["0.weight"].tolist() == [[True, True, False], [False, False, False]]
    assert report.sparsity == pytest.approx(4 / 6)

    model = _model(torch.tensor([[0.1, -2.0, 0.05], [0.01, 0.02, -0.03]]))
    GroupLasso(model, LAM).prune(threshold=0.1)  # second row's norm is 0.037
    assert pk.masks(model)["0.weight"].tolist() == [[True, True, True], [False, False, False]]
    model = _model(torch.tensor([[0.1, -2.0, 0.05], [0.01, 0.02, -0.03]]))
    SparseGroupLasso(model, LAM).prune(threshold=0.06)  # groups, then single weights in kept groups
    assert pk.masks(model)["0.weight"].tolist() == [[True, True, False], [False, False, False]]


def test_proximal_group_lasso_training_zeroes_whole_neurons():
    torch.manual_seed(0)
    train_set, _ = synthetic_classification(n=256, features=20, classes=4, informative=4)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    penalty = GroupLasso(model, 0.02, groups="column", targets=["0"])  # input features
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = train_set.tensors
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        penalty.proximal_step(lr=0.1)
    zero_columns = (model[0].weight.detach().abs().sum(dim=0) == 0)
    assert zero_columns[4:].float().mean() > 0.8  # the noise features are cut exactly
    assert not zero_columns[:4].any()  # the informative ones stay
    penalty.prune(threshold=0.0)
    assert pk.masks(model)["0.weight"][:, zero_columns].sum() == 0


def test_bad_penalty_arguments_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="strength"):
        L1(model, -1.0)
    with pytest.raises(ValueError, match="l1_ratio"):
        ElasticNet(model, 0.1, l1_ratio=1.5)
    with pytest.raises(ValueError, match="groups must be"):
        GroupLasso(model, 0.1, groups="2:4")
    with pytest.raises(ValueError, match="did you mean 'group_lasso'"):
        get_penalty("group_laso", model)
    with pytest.raises(ValueError, match="kernel granularity needs"):
        GroupLasso(model, 0.1, groups="kernel")
    with pytest.raises(ValueError, match="lr"):
        L1(model, 0.1).proximal_step(lr=-1)
