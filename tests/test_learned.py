"""Learned masks: straight-through gradients (dL/dS = dL/dW' * W), exact top-k and threshold masks,
schedules, and conversion to plain masks."""

import math

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.models import LeNet300100
from prunekit.regularizers import LearnedMasks
from prunekit.regularizers.learned import TopKBinarizer


def _model():
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    return model


def test_straight_through_gradient_of_scores_is_grad_times_weight():
    model = _model()
    lm = LearnedMasks(model, "topk", density=2 / 3)  # scores = |w|: keeps 1 and -2
    assert lm.binary_masks()["0.weight"].tolist() == [[True, True, False]]
    model(torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()  # dL/dW' = x
    scores = lm.masks["0.weight"].scores
    torch.testing.assert_close(scores.grad, torch.tensor([[1.0, -4.0, 1.5]]))  # x * w, masked entry too
    weight = model[0].parametrizations.weight.original
    torch.testing.assert_close(weight.grad, torch.tensor([[1.0, 2.0, 0.0]]))  # x * mask


def test_topk_keeps_exactly_ceil_density_n_per_layer():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.1, 0.5])
    assert TopKBinarizer.apply(scores, 0.4).tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert TopKBinarizer.apply(scores, 0.5).sum() == 3  # ceil(2.5)
    assert TopKBinarizer.apply(scores, 0.0).sum() == 0
    torch.manual_seed(0)
    model = LeNet300100()
    lm = LearnedMasks(model, "topk", density=0.1)
    for name, mask in lm.binary_masks().items():
        assert int(mask.sum()) == math.ceil(0.1 * mask.numel()), name


def test_threshold_mode_and_its_penalty():
    model = _model()
    lm = LearnedMasks(model, "threshold", threshold=0.5, init="constant", init_value=0.0)
    assert lm.binary_masks()["0.weight"].tolist() == [[False, False, False]]  # sigmoid(0) = 0.5, not > 0.5
    with torch.no_grad():
        lm.masks["0.weight"].scores.copy_(torch.tensor([[1.0, -1.0, 0.2]]))
    assert lm.binary_masks()["0.weight"].tolist() == [[True, False, True]]
    penalty = lm.penalty()
    s = torch.sigmoid(torch.tensor([1.0, -1.0, 0.2]))
    assert penalty.item() == pytest.approx(float(s.mean()))
    penalty.backward()
    torch.testing.assert_close(lm.masks["0.weight"].scores.grad[0], s * (1 - s) / 3)


def test_schedule_drives_the_density_and_to_masks_keeps_the_function():
    torch.manual_seed(0)
    model = LeNet300100()
    lm = LearnedMasks(model, "topk", schedule=pk.schedules.AGP(initial=0.0, final=0.8, start=0, end=10, every=1))
    assert lm.density == 1.0
    for _ in range(10):
        lm.step()
    assert lm.density == pytest.approx(0.2)
    x = torch.randn(4, 64)
    expected = model(x)
    binary = lm.binary_masks()
    masks = lm.to_masks()
    assert all(masks[n].equal(binary[n]) for n in masks)
    torch.testing.assert_close(model(x), expected)
    assert pk.sparsity(model) == pytest.approx(0.8, abs=1e-3)
    assert not any("scores" in n for n, _ in model.named_parameters())
    with pytest.raises(RuntimeError, match="already removed"):
        lm.to_masks()


def test_hard_movement_training_moves_the_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1]]))
    lm = LearnedMasks(model, "topk", density=0.5)
    opt = torch.optim.SGD([*model.parameters()], lr=0.05)
    x = torch.randn(256, 8)
    y = x[:, 4:].sum(dim=1, keepdim=True)  # only the small weights' inputs matter
    for _ in range(200):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    assert lm.binary_masks()["0.weight"].tolist() == [[False] * 4 + [True] * 4]


def test_learned_masks_refuse_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="mode"):
        LearnedMasks(model, "soft")
    with pytest.raises(ValueError, match="density"):
        LearnedMasks(model, density=1.5)
    with pytest.raises(ValueError, match="threshold"):
        LearnedMasks(model, "threshold", threshold=1.0)
    with pytest.raises(ValueError, match="schedule"):
        LearnedMasks(model, "threshold", schedule=pk.schedules.OneShot(0.5))
    with pytest.raises(ValueError, match="init"):
        LearnedMasks(model, init="zeros")
    assert not any("scores" in n for n, _ in model.named_parameters())
