"""OBD: 1/2 h_ii w^2 with h_ii the per-sample empirical Fisher diagonal, against an exact Hessian."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.statistics import collect_gradient_statistics
from prunekit.targets import resolve_targets


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def samples(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def fisher_by_hand(model, x, y):
    """(1/N) sum_n (dl_n/dw)^2, one backward pass per sample."""
    params = [m.weight for m in model if isinstance(m, nn.Linear)]
    sums = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        for s, g in zip(sums, grads):
            s += g.square()
    return [s / len(y) for s in sums]


def fisher(model, data, loss_fn=None):
    stats = collect_gradient_statistics(model, resolve_targets(model, None, ()), data, loss_fn, frozenset({"fisher"}))
    return [s.fisher_diag for s in stats.values()]


def test_fisher_is_the_mean_of_per_sample_squared_gradients_whatever_the_batching():
    model, (x, y) = mlp(), samples()
    expected = fisher_by_hand(model, x, y)
    one = fisher(model, [(x, y)])
    eight = fisher(model, [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)])
    for e, a, b in zip(expected, one, eight):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(b, e, rtol=1e-4, atol=1e-9)
    # the square of one batch's mean gradient (the old estimate) is far from it
    params = [m.weight for m in model if isinstance(m, nn.Linear)]
    mean_sq = [g.square() for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)]
    assert all((m.sum() < 0.5 * e.sum()) for m, e in zip(mean_sq, expected))


def test_obd_masks_do_not_depend_on_the_batching():
    model, (x, y) = mlp(), samples()
    a, b = mlp(), mlp()
    pk.prune(a, 0.6, method="obd", data=[(x, y)])
    pk.prune(b, 0.6, method="obd", data=[(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)])
    assert all(torch.equal(m, n) for m, n in zip(pk.masks(a).values(), pk.masks(b).values()))
    expected = [0.5 * f * m.weight.detach().square() for f, m in zip(fisher_by_hand(model, x, y), layers(model))]
    flat = torch.cat([e.flatten() for e in expected])
    kept = torch.cat([m.flatten() for m in pk.masks(a).values()])
    assert int((~kept).sum()) == round(0.6 * flat.numel())
    assert flat[~kept].max() <= flat[kept].min()


def layers(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def logistic_problem(n=4000, d=4, k=3, seed=0):
    """Samples drawn from a softmax regression, and a model fitted to them (at its optimum)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(k, d, generator=g) * 2
    x = torch.randn(n, d, generator=g)
    y = torch.multinomial(F.softmax(x @ truth.t(), 1), 1, generator=g).squeeze(1)
    model = nn.Linear(d, k, bias=False)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    model.weight.grad = None
    hessian = torch.autograd.functional.hessian(
        lambda w: F.cross_entropy(x @ w.reshape(k, d).t(), y), model.weight.detach().reshape(-1))
    return model, x, y, hessian.diagonal().reshape(k, d)


def test_expected_fisher_equals_the_exact_hessian_diagonal_of_softmax_regression():
    # For linear logits the Hessian of the cross-entropy is E_x[J^T (diag p - p p^T) J], which is the
    # expected Fisher E_x E_{y~p}[g g^T]: listing every label of every x, each weighted by p(y|x) through
    # the loss (sqrt(p) * l, so that the squared gradient carries p), gives it exactly, at any point.
    model, x, y, _ = logistic_problem(n=300)
    with torch.no_grad():
        model.weight.add_(0.3)  # away from the optimum: the identity still holds
    k = model.out_features
    hessian = torch.autograd.functional.hessian(
        lambda w: F.cross_entropy(x @ w.reshape(k, -1).t(), y), model.weight.detach().reshape(-1)
    ).diagonal().reshape(k, -1)
    xs, ys = x.repeat_interleave(k, 0), torch.arange(k).repeat(len(x))

    def weighted(out, labels):
        p = F.softmax(out, 1).gather(1, labels[:, None]).squeeze(1).detach()
        return (p.sqrt() * F.cross_entropy(out, labels, reduction="none")).mean()

    (diag,) = fisher(model, [(xs, ys)], weighted)
    torch.testing.assert_close(diag * k, hessian, rtol=1e-4, atol=1e-7)


def test_empirical_fisher_approaches_the_exact_hessian_at_the_optimum():
    # With labels drawn from the model's own distribution, the empirical Fisher (true labels) estimates the
    # expected Fisher = Hessian at the optimum; the error is sampling noise, O(1/sqrt(N)): 4.3% at N = 4000.
    model, x, y, hessian = logistic_problem()
    (diag,) = fisher(model, [(x, y)])
    assert ((diag - hessian).abs() / hessian).max() < 0.08
    # the old estimate, the squared gradient of the one batch, is ~0 at the optimum
    (old,) = torch.autograd.grad(F.cross_entropy(model(x), y), [model.weight])
    assert (old.square() / hessian).max() < 1e-6


def test_obd_in_a_pruner_needs_calibration_data():
    model = mlp()
    with pytest.raises(ValueError, match="per-sample gradients"):
        pk.Pruner(model, pk.schedules.OneShot(0.5, at=0), method="obd")
    assert pk.masks(model) == {}


class ItemNet(nn.Module):
    """Data-dependent control flow (``.item()``), which ``vmap`` cannot run."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x) * (2.0 if x.sum().item() > 1e9 else 1.0)


def test_models_vmap_cannot_run_fall_back_to_one_backward_per_sample():
    torch.manual_seed(0)
    model, (x, y) = ItemNet(), samples(16)
    with pytest.warns(UserWarning, match="fall back to one backward pass per sample"):
        (diag,) = fisher(model, [(x, y)])
    expected = torch.zeros_like(model.fc.weight)
    for i in range(16):
        (g,) = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), [model.fc.weight])
        expected += g.square() / 16
    torch.testing.assert_close(diag, expected, rtol=1e-4, atol=1e-9)
