"""Dynamic network surgery: the two-threshold rule, straight-through updates, splicing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.regularizers import DynamicNetworkSurgery

torch.set_num_threads(1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def test_first_surgery_is_the_threshold_rule():
    model = _model()
    w = model[0].weight.detach().numpy().copy()
    dns = DynamicNetworkSurgery(model, c=0.5, targets=["0"])
    m = np.abs(w)
    r = max(m.mean() + 0.5 * m.std(), 0.0)  # numpy std: population, as the reference
    expected = ~(m < 0.9 * r)  # the mask starts full: only |w| < a goes; the band keeps its weights
    assert np.array_equal(dns.binary_masks()["0.weight"].numpy(), expected)
    assert dns.thresholds["0.weight"] == pytest.approx((0.9 * r, 1.1 * r))
    # the forward pass sees W * T
    x = torch.randn(4, 8)
    assert torch.allclose(model[0](x), x @ (torch.from_numpy(w) * torch.from_numpy(expected)).t() + model[0].bias)


def test_pruned_weights_get_the_gradient_and_splice_back():
    model = _model()
    dns = DynamicNetworkSurgery(model, c=0.5, gamma=0.0, targets=["0"])  # gamma 0: revise at every step
    a, b = dns.thresholds["0.weight"]
    mask = dns.binary_masks()["0.weight"]
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    F.cross_entropy(model(x), y).backward()
    raw = pk.masking.raw_parameter(model[0], "weight")
    # straight through: the raw weight's gradient is the gradient of the masked weight, pruned entries too
    effective = (raw.detach() * mask).requires_grad_(True)
    hidden = F.relu(F.linear(x, effective, model[0].bias))
    (reference,) = torch.autograd.grad(F.cross_entropy(model[2](hidden), y), effective)
    assert torch.allclose(raw.grad, reference) and raw.grad[~mask].abs().sum() > 0
    i = tuple((~mask).nonzero()[0].tolist())
    j = tuple(mask.nonzero()[0].tolist())
    with torch.no_grad():
        raw[i] = 1.5 * b  # a pruned weight that grew past b comes back
        raw[j] = 0.5 * (a + b)  # a kept weight inside the band stays
    assert dns.step()
    new = dns.binary_masks()["0.weight"]
    assert new[i] and new[j]
    with torch.no_grad():
        raw[i] = 0.5 * (a + b)  # inside the band again: it stays kept
        raw[j] = 0.5 * a  # below a: it goes
    dns.step()
    new = dns.binary_masks()["0.weight"]
    assert new[i] and not new[j]
    final = dns.to_masks()
    assert torch.equal(pk.masks(model)["0.weight"], new) and torch.equal(final["0.weight"], new)


def test_revision_probability():
    dns = DynamicNetworkSurgery(_model(), gamma=1e-2, power=2.0, stop=100)
    assert dns.update_probability(0) == 1.0
    assert dns.update_probability(50) == pytest.approx((1 + 0.5) ** -2)
    assert dns.update_probability(100) == 0.0
    with pytest.raises(ValueError, match="not targets"):
        DynamicNetworkSurgery(_model(), c={"nope.weight": 1.0})
