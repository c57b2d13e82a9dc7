"""Second-order Taylor channel importance (structured method "taylor_so") against an exact Hessian."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import prunekit as pk
from prunekit.structured import DependencyGraph
from prunekit.structured.criteria import GroupTaylorSecondOrder, ScoringContext

torch.set_num_threads(1)


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # large weights: the curvature term is not negligible next to the gradient term
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (16,), generator=g))
            for _ in range(3)]
    return model, data


def _reference(model, data):
    """mean_b (sum_S w g_b - 1/2 sum_S w^2 H_ss)^2 with H the exact Hessian of the mean loss."""
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss(vector, x, y):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = vector[i:i + s.numel()].reshape(s)
            i += s.numel()
        return F.cross_entropy(functional_call(model, parts, (x,)), y)

    H = sum(torch.autograd.functional.hessian(lambda v: loss(v, x, y), flat) for x, y in data) / len(data)
    h = H.diagonal()
    grads = [torch.autograd.functional.jacobian(lambda v: loss(v, x, y), flat) for x, y in data]
    # entries of channel c: fc1.weight[c, :], fc1.bias[c], fc2.weight[:, c]
    offsets = {n: sum(s.numel() for s in shapes[:k]) for k, n in enumerate(names)}
    scores = []
    for c in range(4):
        idx = [offsets["0.weight"] + c * 3 + j for j in range(3)] + [offsets["0.bias"] + c]
        idx += [offsets["2.weight"] + r * 4 + c for r in range(2)]
        idx = torch.tensor(idx)
        w = flat[idx]
        curvature = 0.5 * (w.square() * h[idx]).sum()
        scores.append(torch.stack([((w * g[idx]).sum() - curvature).square() for g in grads]).mean())
    return torch.stack(scores)


def _scores(model, data, probes):
    graph = DependencyGraph(model, data[0][0])
    (group,) = graph.groups()
    return GroupTaylorSecondOrder(probes).score(group, ScoringContext(graph, data)).double()


def test_exact_diagonal_matches_the_exact_hessian():
    model, data = _case()
    expected = _reference(model, data)
    assert torch.allclose(_scores(model, data, None), expected, rtol=1e-6)
    first_order = DependencyGraph(model, data[0][0])
    fo = pk.structured.get_group_criterion("taylor").score(first_order.groups()[0], ScoringContext(first_order, data))
    assert not torch.allclose(fo.double(), expected, rtol=0.05)  # the second-order term matters here


@pytest.mark.slow
def test_hutchinson_estimate_converges_to_the_exact_scores():
    model, data = _case()
    expected = _reference(model, data)
    assert torch.allclose(_scores(model, data, 400), expected, rtol=0.1, atol=1e-3)


def test_prunes_through_structured_prune():
    model, data = _case()
    report = pk.structured.prune(model, data[0][0], 0.5, method="taylor_so", data=data)
    assert model[0].out_features == 2 and report.channels_removed == 2
    with pytest.raises(ValueError, match="data"):
        pk.structured.prune(_case()[0], data[0][0], 0.5, method="taylor_so")
