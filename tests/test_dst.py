"""Dynamic sparse training: SET and RigL drop by magnitude, regrow at random / by dense gradient, keep the
sparsity of every layer, start regrown weights at zero; on digits they end close to dense."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import prunekit as pk
from prunekit.data import digits, evaluate, loaders, make_optimizer, train
from prunekit.masking import PruningMask
from prunekit.models import LeNet300100, TinyMLP
from prunekit.scope import erk_sparsities
from prunekit.training import SET, RigL, SETCosine, cosine_update_fraction

W = [[0.9, -0.1, 0.5, 0.0], [0.3, 0.0, -0.8, 0.2]]
KEPT = [[True, True, True, False], [False, False, True, False]]  # |w| kept: 0.9, 0.1, 0.5, 0.8


def _layer():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(W))
    pk.masking.attach(model, "0.weight", torch.tensor(KEPT))
    return model


def _backward_with_gradient(model, grad):
    """A loss whose gradient with respect to the (effective) weight is ``grad``."""
    out = model(torch.eye(4))  # out[b, i] = W[i, b]
    (out * grad.T).sum().backward()


def test_cosine_update_fraction():
    assert cosine_update_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_update_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_update_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_update_fraction(100, 0.3, 100) == 0.0


def test_rigl_drops_the_smallest_magnitudes_and_grows_the_largest_dense_gradients():
    model = _layer()
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    rigl = RigL(model, 0.5, end=10, update_every=1, alpha=0.55, optimizer=opt)  # k = int(0.536 * 4) = 2
    grad = torch.tensor([[0.0, 5.0, 0.1, 0.2], [0.3, 4.0, 0.0, 0.1]])  # largest among candidates: (0,1), (1,1)
    _backward_with_gradient(model, grad)
    opt.step()
    assert opt.state[model[0].parametrizations.weight.original]["exp_avg_sq"].abs().sum() > 0
    update = rigl.step()
    mask = pk.masks(model)["0.weight"]
    # 0.1 and 0.5 (smallest active) dropped; 0.9 and -0.8 kept; grown: (0,1) (just dropped) and (1,1)
    assert mask.tolist() == [[True, True, False, False], [False, True, True, False]]
    weight = model[0].parametrizations.weight.original.detach()
    torch.testing.assert_close(weight, torch.tensor([[0.9, -0.1, 0.0, 0.0], [0.0, 0.0, -0.8, 0.0]]))  # (1,1) starts at 0
    assert update.changed == {"0.weight": 1}  # one weight really moved; (0,1) was dropped and regrown
    state = opt.state[model[0].parametrizations.weight.original]
    changed = ~(mask & torch.tensor(KEPT))
    assert state["exp_avg"][changed].abs().sum() == 0 and state["exp_avg_sq"][changed].abs().sum() == 0
    # the probe is gone again after the update (and re-armed only before the next update step)
    plist = model[0].parametrizations.weight
    assert len(plist) in (1, 2) and isinstance(plist[0], PruningMask)


def test_dense_gradient_probe_is_attached_only_around_update_steps():
    model = TinyMLP()
    rigl = RigL(model, 0.8, end=100, update_every=3)
    lengths = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(7):
        opt.zero_grad()
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        rigl.step()
        lengths.append(len(model.fc1.parametrizations.weight))
    # after steps 1..7: armed before steps 3 and 6 (i.e. after steps 2 and 5)
    assert lengths == [1, 2, 1, 1, 2, 1, 1]
    assert [u.step for u in rigl.history] == [3, 6]
    rigl.close()
    pk.finalize(model)
    assert not parametrize.is_parametrized(model.fc1)


def test_rigl_without_a_backward_pass_says_what_to_do():
    model = TinyMLP()
    rigl = RigL(model, 0.8, end=100, update_every=1)
    with pytest.raises(RuntimeError, match="no gradient was recorded"):
        rigl.step()


def test_set_keeps_every_layer_at_its_erk_sparsity_and_regrown_weights_start_at_zero():
    torch.manual_seed(0)
    model = LeNet300100()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = SET(model, 0.9, end=50, update_every=5, distribution="erk", optimizer=opt, seed=3)
    names = [n for n in pk.masks(model)]
    expected = erk_sparsities([tuple(pk.masks(model)[n].shape) for n in names], 0.9)
    counts = {n: int(m.sum()) for n, m in pk.masks(model).items()}
    for n, s in zip(names, expected):
        assert counts[n] == pk.masks(model)[n].numel() - round(s * pk.masks(model)[n].numel())
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 21):
        before = {n: m.clone() for n, m in pk.masks(model).items()}
        opt.zero_grad()
        x, y = torch.randn(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        update = dst.step()
        after = pk.masks(model)
        assert {n: int(m.sum()) for n, m in after.items()} == counts
        if update is not None:
            for n in names:
                grown = after[n] & ~before[n]
                raw = model.get_submodule(n.rpartition(".")[0]).parametrizations.weight.original
                assert grown.any() and raw.detach()[grown].abs().sum() == 0
                assert opt.state[raw]["momentum_buffer"][grown].abs().sum() == 0
    assert [u.step for u in dst.history] == [5, 10, 15, 20]
    assert [u.fraction for u in dst.history] == [0.3] * 4  # zeta is constant (Mocanu et al.)
    assert pk.sparsity(model) == pytest.approx(0.9, abs=1e-3)


def test_set_drops_zeta_of_the_smallest_positive_and_of_the_largest_negative_weights():
    weights = torch.tensor([[0.9, -0.1, 0.7, -0.3, 0.05], [0.6, -0.4, 0.8, -0.2, 0.0]])
    active = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    model = nn.Sequential(nn.Linear(5, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weights)
    pk.masking.attach(model, "0.weight", active)
    dst = SET(model, 0.1, end=10, update_every=1, zeta=0.5, seed=1)
    # active positives 0.9 0.7 0.6 0.8: int(0.5 * 4) = 2 smallest go (0.6, 0.7);
    # active negatives -0.1 -0.3 -0.4 -0.2: int(0.5 * 4) = 2 closest to zero go (-0.1, -0.2);
    # the active exact zero lies between the two thresholds and goes too
    kept = dst.drop(dst.targets[0], active.reshape(-1), 0.5).reshape(2, 5)
    assert kept.tolist() == [[True, False, False, True, False], [False, True, True, False, False]]
    # by magnitude over both signs (RigL's drop, SETCosine): int(0.5 * 9) = 4 smallest |w|, 0 -0.1 -0.2 -0.3
    magnitude = SETCosine(model, 0.1, end=10, update_every=1).drop(dst.targets[0], active.reshape(-1), 0.5)
    assert magnitude.reshape(2, 5).tolist() == [[True, False, True, False, False], [True, True, True, False, False]]
    update = dst.step()  # the whole update: 5 dropped, 5 regrown at random, density unchanged
    assert update.fraction == 0.5 and int(pk.masks(model)["0.weight"].sum()) == 9
    with pytest.raises(ValueError, match="zeta"):
        SET(nn.Sequential(nn.Linear(3, 3)), 0.5, end=10, zeta=0.0)


def test_set_growth_is_seeded_and_uniform_allocation_is_uniform():
    masks = []
    for seed in (1, 1, 2):
        torch.manual_seed(0)
        model = TinyMLP()
        dst = SET(model, 0.75, end=10, update_every=1, distribution="uniform", seed=seed)
        assert pk.sparsity(model, per_layer=True) == pytest.approx({"fc1.weight": 0.75, "fc2.weight": 0.75})
        dst.step()
        masks.append(pk.masks(model)["fc1.weight"].clone())
    assert masks[0].equal(masks[1]) and not masks[0].equal(masks[2])


def test_dst_keeps_existing_masks_and_refuses_bad_arguments():
    model = TinyMLP()
    pk.prune(model, 0.6, scope="local")
    before = {n: m.clone() for n, m in pk.masks(model).items()}
    SET(model, 0.9, end=10)
    assert all(pk.masks(model)[n].equal(m) for n, m in before.items())  # e.g. a SNIP mask stays
    fresh = TinyMLP()
    for kwargs, message in [
        (dict(sparsity=1.0, end=10), "sparsity"),
        (dict(end=0), "end"),
        (dict(end=10, update_every=0), "update_every"),
        (dict(end=10, alpha=0.0), "alpha"),
        (dict(end=10, distribution="erdos"), "distribution"),
        (dict(end=10, exclude=["fc9"]), "matches none"),
    ]:
        with pytest.raises(ValueError, match=message):
            RigL(fresh, **kwargs)
    assert pk.masks(fresh) == {}


@pytest.mark.slow
def test_set_and_rigl_at_90_percent_end_within_two_points_of_dense():
    train_set, test_set = digits()
    epochs, lr = 30, 3e-3
    torch.manual_seed(0)
    train_loader, test_loader = loaders(train_set, test_set, batch_size=64, seed=0)
    dense = LeNet300100()
    train(dense, train_loader, epochs=epochs, lr=lr)
    dense_accuracy = evaluate(dense, test_loader)
    total = epochs * len(train_loader)
    for cls in (SET, RigL):
        torch.manual_seed(0)
        train_loader, _ = loaders(train_set, test_set, batch_size=64, seed=0)
        model = LeNet300100()
        opt = make_optimizer(model, "adam", lr)
        dst = cls(model, 0.9, end=int(0.75 * total), update_every=25, distribution="erk", optimizer=opt)
        train(model, train_loader, epochs=epochs, optimizer=opt, callback=lambda step: dst.step())
        assert pk.sparsity(model) == pytest.approx(0.9, abs=1e-3)
        assert len(dst.history) == (int(0.75 * total) - 1) // 25
        accuracy = evaluate(model, test_loader)
        assert accuracy >= dense_accuracy - 0.02, (cls.name, accuracy, dense_accuracy)
