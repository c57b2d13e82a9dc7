"""Structured redundancy criteria (similarity, correlation) against their formulas, computed pair by pair."""

import torch
from torch import nn

import prunekit as pk
from prunekit.structured import DependencyGraph
from prunekit.structured.criteria import ScoringContext, get_group_criterion, ranked_redundancy


def redundancy_by_hand(vectors, rank):
    """1 - max(0, cos) to any row ranked higher (ties: the earlier row ranks higher); zero rows 0."""
    n = len(vectors)
    order = sorted(range(n), key=lambda i: (-float(rank[i]), i))
    out = []
    for i in range(n):
        if float(vectors[i].norm()) == 0:
            out.append(0.0)
            continue
        best = 0.0
        for j in order[: order.index(i)]:
            if float(vectors[j].norm()) > 0:
                best = max(best, float(vectors[i] @ vectors[j] / (vectors[i].norm() * vectors[j].norm())))
        out.append(1.0 - min(best, 1.0))
    return torch.tensor(out)


def test_ranked_redundancy_matches_the_pairwise_formula_and_keeps_negative_correlation():
    torch.manual_seed(0)
    vectors = torch.randn(7, 5)
    vectors[2] = 0  # dead
    vectors[4] = vectors[1]  # duplicate
    vectors[6] = -vectors[0]  # opposite: information, not redundancy
    rank = vectors.norm(dim=1)
    got = ranked_redundancy(vectors, rank)
    torch.testing.assert_close(got, redundancy_by_hand(vectors, rank), atol=1e-6, rtol=0)
    assert got[2] == 0 and got[4] < 1e-6 and got[6] > 0.5
    assert set(torch.argsort(got)[:2].tolist()) == {2, 4}


def convnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 3, 1))
    with torch.no_grad():
        model[0].weight[2] = 0
        model[0].bias[2] = 0
        model[0].weight[4] = model[0].weight[1]
        model[0].bias[4] = model[0].bias[1]
    return model


def test_similarity_removes_the_dead_filter_and_the_duplicate_first():
    model = convnet()
    x = torch.randn(2, 2, 6, 6)
    graph = DependencyGraph(model, x)
    scores = get_group_criterion("similarity").score(graph.groups()[0], ScoringContext(graph))
    w = torch.cat([model[0].weight.detach().flatten(1), model[0].bias.detach()[:, None]], 1)
    torch.testing.assert_close(scores, redundancy_by_hand(w, w.norm(dim=1)), atol=1e-6, rtol=0)
    report = pk.structured.prune(model, x, 2 / 6, method="similarity")
    assert set(report.groups[0].removed) == {2, 4}


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight[0] = 0
        model[0].bias[0] = -1.0  # dead: relu(-1) = 0 for every input
        model[0].weight[3] = model[0].weight[1]
        model[0].bias[3] = model[0].bias[1]
        model[0].weight[5] = -model[0].weight[4]  # opposite pre-activation: negatively correlated
        model[0].bias[5] = -model[0].bias[4]
    return model


def test_correlation_removes_the_dead_and_the_duplicate_channel_first_and_keeps_anticorrelated_ones():
    model = mlp()
    data = [(torch.randn(64, 4), torch.zeros(64, dtype=torch.long)) for _ in range(2)]
    graph = DependencyGraph(model, data[0][0][:2])
    scores = get_group_criterion("correlation").score(graph.group_of("0"), ScoringContext(graph, data))
    with torch.no_grad():
        acts = torch.cat([torch.relu(model[0](x)) for x, _ in data])
    expected = redundancy_by_hand((acts - acts.mean(0)).t(), acts.abs().mean(0))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    corr = torch.corrcoef(acts[:, 4:].t())[0, 1]
    assert corr < -0.2 and min(scores[4], scores[5]) > 0.3  # anticorrelated: neither is made redundant
    report = pk.structured.prune(model, data[0][0][:2], 2 / 6, method="correlation", data=data)
    assert set(report.groups[0].removed) == {0, 3}
