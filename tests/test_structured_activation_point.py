"""Activation criteria read the activation function's output (Hu et al.'s APoZ point) by default, or, with
at="input", what the next layer reads (after pooling); checked against hooks on a hand-written forward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.structured import DependencyGraph
from prunekit.structured.criteria import APoZ, Entropy, MeanActivation, ScoringContext, histogram_entropy


class PoolNet(nn.Module):
    """conv - ReLU (a module called twice) - max pool - conv - functional ReLU - linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        a = self.relu(self.conv1(x))  # measuring point of conv1's channels
        b = self.relu(self.conv2(F.max_pool2d(a, 2)))  # the same ReLU module, second call
        c = F.relu(self.conv3(b))
        return self.fc(c.mean((2, 3)))


def model_and_data():
    torch.manual_seed(0)
    model = PoolNet().eval()
    with torch.no_grad():
        model.conv1.bias.copy_(torch.tensor([-0.2, 0.0, 0.3, -0.5]))
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(2)]
    return model, data


def by_hand(model, data):
    """Each group's activation output and what the next layer reads, from a hand-written forward."""
    with torch.no_grad():
        outs = {"conv1": [], "pooled": [], "conv2": [], "conv3": []}
        for x, _ in data:
            a = torch.relu(model.conv1(x))
            p = F.max_pool2d(a, 2)
            b = torch.relu(model.conv2(p))
            c = torch.relu(model.conv3(b))
            for key, value in (("conv1", a), ("pooled", p), ("conv2", b), ("conv3", c)):
                outs[key].append(value)
    return {k: torch.cat(v) for k, v in outs.items()}


def per_channel(t):
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def test_apoz_activation_and_entropy_read_the_relu_output_by_default():
    model, data = model_and_data()
    graph = DependencyGraph(model, data[0][0][:2])
    ctx = ScoringContext(graph, data)
    hand = by_hand(model, data)
    for layer in ("conv1", "conv2", "conv3"):
        group = graph.group_of(layer)
        rows = per_channel(hand[layer])
        torch.testing.assert_close(APoZ().score(group, ctx), 1 - (rows == 0).float().mean(1))
        torch.testing.assert_close(MeanActivation().score(group, ctx), rows.abs().mean(1))
        torch.testing.assert_close(Entropy().score(group, ctx), histogram_entropy(hand[layer].mean((2, 3))))


def test_at_input_reads_the_next_layers_input_after_pooling():
    model, data = model_and_data()
    graph = DependencyGraph(model, data[0][0][:2])
    ctx = ScoringContext(graph, data)
    hand = by_hand(model, data)
    group = graph.group_of("conv1")
    pooled = per_channel(hand["pooled"])
    at_input = APoZ(at="input").score(group, ctx)
    torch.testing.assert_close(at_input, 1 - (pooled == 0).float().mean(1))
    # max pooling hides zeros: the two points differ, and the default is the paper's
    assert not torch.allclose(at_input, APoZ().score(group, ctx))
    with pytest.raises(ValueError, match="at must be one of"):
        APoZ(at="pool")


def test_structured_prune_with_apoz_removes_the_channel_with_the_most_zeros_at_the_relu():
    model, data = model_and_data()
    with torch.no_grad():
        model.conv1.bias[1] = -50.0  # channel 1 of conv1: ReLU output always 0
    x = data[0][0][:2]
    report = pk.structured.prune(model, x, 0.25, method="apoz", data=data, scope="local")
    removed = {g.name: g.removed for g in report.groups}
    assert 1 in removed["conv1"]


def test_lda_is_the_fisher_ratio_of_the_pooled_relu_output_between_the_classes():
    model, data = model_and_data()
    graph = DependencyGraph(model, data[0][0][:2])
    from prunekit.structured.criteria import get_group_criterion

    scores = get_group_criterion("lda").score(graph.group_of("conv2"), ScoringContext(graph, data))
    pooled = by_hand(model, data)["conv2"].mean((2, 3))  # (samples, channels): global average pooling
    labels = torch.cat([y for _, y in data])
    expected = []
    for c in range(pooled.shape[1]):
        v, mean = pooled[:, c], pooled[:, c].mean()
        between = sum(float((labels == k).sum()) * float(v[labels == k].mean() - mean) ** 2 for k in labels.unique())
        within = sum(float(((v[labels == k] - v[labels == k].mean()) ** 2).sum()) for k in labels.unique())
        expected.append(between / within)
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-4, atol=1e-6)
