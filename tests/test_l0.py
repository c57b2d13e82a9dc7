"""L0 hard-concrete gates: the paper's formulas, exact conversion to masks and to surgery, and >= 90%
sparsity within a point of dense on digits."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.data import digits, evaluate, loaders, train
from prunekit.models import LeNet5, LeNet300100, TinyMLP
from prunekit.regularizers import L0, HardConcrete
from prunekit.regularizers.l0 import BETA, GAMMA, ZETA


def _gates(values):
    gate = HardConcrete((len(values),))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(values))
    return gate


def test_constants_and_deterministic_gates_follow_the_paper():
    assert (BETA, GAMMA, ZETA) == (2 / 3, -0.1, 1.1)
    gate = _gates([0.0, -3.0, 3.0, 1.0])
    expected = [0.5, 0.0, 1.0, 1 / (1 + math.exp(-1.0)) * 1.2 - 0.1]  # clamp(sigmoid(a) (zeta - gamma) + gamma)
    torch.testing.assert_close(gate.deterministic(), torch.tensor(expected))
    gate.eval()
    torch.testing.assert_close(gate.gate(), torch.tensor(expected))


def test_expected_l0_matches_the_sampling_frequency_of_nonzero_gates():
    torch.manual_seed(0)
    gate = _gates([0.0, -1.0, 2.0])
    # P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))
    shift = (2 / 3) * math.log(0.1 / 1.1)
    expected = torch.sigmoid(torch.tensor([0.0, -1.0, 2.0]) - shift)
    torch.testing.assert_close(gate.prob_nonzero(), expected)
    many = HardConcrete((20000, 3))  # 20000 independent draws of the same three gates
    with torch.no_grad():
        many.log_alpha.copy_(gate.log_alpha.expand(20000, 3))
    samples = many.sample()
    assert samples.min() == 0.0 and samples.max() == 1.0  # hard: exact zeros and ones occur
    torch.testing.assert_close((samples != 0).float().mean(0), expected.detach(), atol=0.015, rtol=0)


def test_penalty_is_the_expected_fraction_of_nonzero_weights_and_trains_log_alpha():
    model = TinyMLP(in_features=8, hidden=4, num_classes=2)
    l0 = L0(model, "neuron")
    probs = {n: g.prob_nonzero().detach() for n, g in l0.gates.items()}
    expected = float(probs["fc1.weight"].sum() * 8 + probs["fc2.weight"].sum() * 4)
    assert l0.expected_l0().item() == pytest.approx(expected, rel=1e-5)
    assert l0.penalty().item() == pytest.approx(expected / (32 + 8), rel=1e-5)
    l0.penalty().backward()
    assert all((g.log_alpha.grad > 0).all() for g in l0.gates.values())  # lowering log_alpha lowers L0
    assert {id(p) for p in l0.parameters()} <= {id(p) for p in model.parameters()}


def test_weight_gates_convert_to_masks_computing_the_same_function():
    torch.manual_seed(0)
    model = LeNet300100()
    pk.prune(model, 0.3)  # gates compose with existing masks
    l0 = L0(model, "weight")
    with torch.no_grad():
        for gate in l0.gates.values():
            gate.log_alpha.normal_(0.0, 3.0)
    x = torch.randn(16, 64)
    model.train()
    assert not torch.equal(model(x), model(x))  # stochastic gates in training
    model.eval()
    expected = model(x)
    sparsity = l0.sparsity()
    masks = l0.to_masks()
    torch.testing.assert_close(model(x), expected)
    assert pk.sparsity(model) >= sparsity  # the old masks stay too
    assert all("log_alpha" not in n for n, _ in model.named_parameters())
    assert set(masks) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    with pytest.raises(RuntimeError, match="already removed"):
        l0.to_masks()
    pk.finalize(model)
    torch.testing.assert_close(model(x), expected)


def test_channel_gates_close_whole_units_bias_included_and_feed_surgery():
    torch.manual_seed(0)
    model = LeNet5()
    l0 = L0(model, "channel", exclude=["fc3"])
    with torch.no_grad():
        for gate in l0.gates.values():
            gate.log_alpha.copy_(torch.where(torch.rand_like(gate.log_alpha) < 0.5, -5.0, 5.0))
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    expected = model(x)
    kept = l0.structured()
    assert set(kept) == {"conv1", "conv2", "fc1", "fc2"}
    masks = l0.to_masks()
    torch.testing.assert_close(model(x), expected)
    assert masks["conv1.bias"].equal(kept["conv1"])
    assert masks["conv1.weight"].equal(kept["conv1"][:, None, None, None].expand(6, 1, 5, 5))

    surgery = copy.deepcopy(model)
    from prunekit.structured import remove_dead

    remove_dead(surgery, x)
    assert surgery.conv1.out_channels == int(kept["conv1"].sum())
    assert surgery.fc2.out_features == int(kept["fc2"].sum())
    torch.testing.assert_close(surgery(x), expected, atol=1e-5, rtol=1e-5)


def test_to_structured_removes_closed_neurons_physically():
    torch.manual_seed(0)
    model = LeNet300100()
    l0 = L0(model, "neuron", exclude=["fc3"])
    with torch.no_grad():
        l0.gates["fc1.weight"].log_alpha[:200] = -5.0
        l0.gates["fc2.weight"].log_alpha[50:] = -5.0
        l0.gates["fc2.weight"].log_alpha[:50] = 5.0
    x = torch.randn(8, 64)
    model.eval()
    expected = model(x)
    l0.to_structured(x)
    assert (model.fc1.out_features, model.fc2.in_features, model.fc2.out_features) == (100, 100, 50)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_l0_refuses_bad_input_before_changing_anything():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="granularity"):
        L0(model, "kernel")
    with pytest.raises(ValueError, match="Embedding|is not one"):
        L0(model, targets=["0"])
    with pytest.raises(ValueError, match="droprate_init"):
        L0(model, targets=["1"], droprate_init=1.0)
    with pytest.raises(ValueError, match="to_masks"):
        L0(TinyMLP(), "weight").to_structured(torch.randn(1, 64))
    assert not any("log_alpha" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_l0_reaches_90_percent_sparsity_within_one_point_of_dense():
    torch.manual_seed(0)
    train_set, test_set = digits()
    train_loader, test_loader = loaders(train_set, test_set, batch_size=64, seed=0)
    model = LeNet300100()
    train(model, train_loader, epochs=20, lr=3e-3)
    dense = evaluate(model, test_loader)
    l0 = L0(model, "weight", droprate_init=0.1)
    gates = {id(p) for p in l0.parameters()}
    opt = torch.optim.Adam(
        [{"params": [p for p in model.parameters() if id(p) not in gates]}, {"params": l0.parameters(), "lr": 0.1}],
        lr=1e-3,
    )
    model.train()
    for _ in range(20):
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y) + 15.0 * l0.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
    l0.to_masks()
    assert pk.sparsity(model) >= 0.90
    assert evaluate(model, test_loader) >= dense - 0.01, (evaluate(model, test_loader), dense)
