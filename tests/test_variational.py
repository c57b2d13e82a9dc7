"""Sparse variational dropout: the KL approximation's numbers, the local reparametrisation trick's mean
and variance, pruning at log alpha > 3, and >= 90% sparsity within a point of dense on digits."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.data import digits, evaluate, loaders, train
from prunekit.models import LeNet300100, TinyMLP
from prunekit.regularizers import SparseVD, kl_approximation
from prunekit.regularizers.variational import K1, K2, K3


def test_kl_approximation_matches_the_paper_formula():
    assert (K1, K2, K3) == (0.63576, 1.87320, 1.48695)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    for log_alpha in (-4.0, 0.0, 2.5):
        negative_kl = K1 * sigmoid(K2 + K3 * log_alpha) - 0.5 * math.log1p(math.exp(-log_alpha)) - K1
        assert kl_approximation(torch.tensor(log_alpha)).item() == pytest.approx(-negative_kl, rel=1e-6)
    assert kl_approximation(torch.tensor(0.0)).item() == pytest.approx(0.43123, abs=1e-5)
    assert kl_approximation(torch.tensor(20.0)).item() < 1e-6  # the prior's favourite: alpha -> infinity


def _linear_vd(log_sigma2):
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -0.5, 0.01], [0.5, 2.0, -1.0]]))
        model[0].bias.copy_(torch.tensor([0.1, -0.2]))
    vd = SparseVD(model)
    with torch.no_grad():
        vd.params["0.weight"].log_sigma2.copy_(torch.tensor(log_sigma2))
    return model, vd


def test_log_alpha_is_log_sigma2_minus_log_theta2_and_the_kl_sums_over_weights():
    model, vd = _linear_vd([[-2.0, -2.0, -2.0], [0.0, 0.0, 0.0]])
    theta = model[0].parametrizations.weight.original.detach()
    expected = (torch.tensor([[-2.0] * 3, [0.0] * 3]) - torch.log(theta.square() + 1e-8)).clamp(-10, 10)
    torch.testing.assert_close(vd.log_alpha()["0.weight"], expected)
    assert vd.kl().item() == pytest.approx(float(kl_approximation(expected).sum()), rel=1e-6)
    assert {id(p) for p in (vd.params["0.weight"].log_sigma2,)} <= {id(p) for p in model.parameters()}


def test_local_reparametrisation_gives_the_right_mean_and_variance():
    torch.manual_seed(0)
    model, vd = _linear_vd([[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]])
    x = torch.tensor([[1.0, 2.0, -1.0]]).expand(50000, 3)
    model.train()
    with torch.no_grad():
        out = model(x)
    theta = model[0].parametrizations.weight.original.detach()
    sigma2 = vd.params["0.weight"].log_sigma2.detach().exp()
    torch.testing.assert_close(out.mean(0), x[0] @ theta.T + model[0].bias.detach(), atol=0.03, rtol=0)
    torch.testing.assert_close(out.var(0), x[0].square() @ sigma2.T, rtol=0.03, atol=1e-3)

    conv = nn.Sequential(nn.Conv2d(1, 2, 2, bias=False))
    vd = SparseVD(conv, init_log_sigma2=-1.0)
    image = torch.rand(1, 1, 3, 3)
    with torch.no_grad():
        out = conv(image.expand(20000, 1, 3, 3))
        variance = F.conv2d(image.square(), torch.full((2, 1, 2, 2), math.exp(-1.0)))[0]
    torch.testing.assert_close(out.var(0), variance, rtol=0.05, atol=1e-3)


def test_evaluation_prunes_log_alpha_above_3_and_to_masks_keeps_the_function():
    model, vd = _linear_vd([[-2.0, -2.0, -2.0], [0.0, 0.0, 0.0]])
    la = vd.log_alpha()["0.weight"].detach()
    keep = la < 3.0
    assert keep.tolist() == [[True, True, False], [True, True, True]]  # theta = 0.01: log alpha = 7.2
    model.eval()
    x = torch.randn(5, 3)
    theta = model[0].parametrizations.weight.original.detach()
    expected = F.linear(x, theta * keep, model[0].bias.detach())
    torch.testing.assert_close(model(x), expected)
    assert vd.sparsity() == pytest.approx(1 / 6)
    masks = vd.to_masks()
    assert masks["0.weight"].equal(keep)
    torch.testing.assert_close(model(x), expected)
    model.train()
    torch.testing.assert_close(model(x), expected)  # no noise left
    assert not any("log_sigma2" in n for n, _ in model.named_parameters())
    with pytest.raises(RuntimeError, match="already removed"):
        vd.kl()


def test_masked_weights_get_no_noise_and_are_pruned():
    model = TinyMLP(in_features=4, hidden=3, num_classes=2)
    with pytest.warns(UserWarning, match="pruned to 100%"):
        pk.prune(model, 0.99, targets=["fc2"], scope="local")
    vd = SparseVD(model, init_log_sigma2=0.0, targets=["fc2"])
    model.train()
    h = torch.randn(8, 4)
    with torch.no_grad():
        out = model(h)
    torch.testing.assert_close(out, model.fc2.bias.expand(8, 2).detach())  # weights all masked: no variance
    assert not vd.keep_masks()["fc2.weight"].any()


def test_sparse_vd_refuses_unsupported_layers():
    model = nn.Sequential(nn.ConvTranspose2d(1, 2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="is not one"):
        SparseVD(model, targets=["0"])
    assert not any("log_sigma2" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_sparse_vd_reaches_90_percent_sparsity_within_one_point_of_dense():
    train_set, test_set = digits()
    epochs, lr = 30, 3e-3
    torch.manual_seed(0)
    train_loader, test_loader = loaders(train_set, test_set, batch_size=64, seed=0)
    dense = LeNet300100()
    train(dense, train_loader, epochs=epochs, lr=lr)
    dense_accuracy = evaluate(dense, test_loader)

    torch.manual_seed(0)
    train_loader, _ = loaders(train_set, test_set, batch_size=64, seed=0)
    model = LeNet300100()
    vd = SparseVD(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        kl_weight = 0.1 * min(1.0, epoch / 10)  # annealed, as in the paper
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y) + kl_weight * vd.kl() / len(train_set)
            opt.zero_grad()
            loss.backward()
            opt.step()
    vd.to_masks()
    accuracy = evaluate(model, test_loader)
    assert pk.sparsity(model) >= 0.90
    assert accuracy >= dense_accuracy - 0.01, (accuracy, dense_accuracy)
