"""SNIP and SynFlow: scores checked by hand on tiny networks, the round schedule, no side effects."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.criteria.init_time import SNIP, SynFlow
from prunekit.models import LeNet5, LeNet300100
from prunekit.pruning import PruningSpec, _round_sparsities
from prunekit.targets import resolve_targets


def _linear(weights, bias=None):
    w = torch.tensor(weights, dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    return layer


def test_snip_scores_are_normalised_gradient_times_weight_from_one_batch():
    model = nn.Sequential(_linear([[1.0, -2.0, 0.5]]))
    first = (torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0]]))
    second = (torch.tensor([[100.0, -7.0, 1.0]]), torch.tensor([[-50.0]]))  # must be ignored
    spec = PruningSpec(model, "snip")
    stats = spec.statistics([first, second], F.mse_loss)
    assert stats["0.weight"].count == 1  # SNIP takes one batch by default
    # out = 1 - 4 + 1.5 = -1.5; dL/dw = 2 (out - y) x = -5 x = [-5, -10, -15]; |g w| = [5, 20, 7.5]
    spec.criterion.prepare(model, spec.targets, stats)
    scores = spec.criterion.score(spec.targets[0], stats["0.weight"])
    torch.testing.assert_close(scores, torch.tensor([[5.0, 20.0, 7.5]]) / 32.5)
    pk.prune(model, 1 / 3, method="snip", data=[first, second], loss_fn=F.mse_loss)
    assert pk.masks(model)["0.weight"].tolist() == [[False, True, True]]


def test_snip_normalisation_runs_over_all_layers():
    torch.manual_seed(0)
    model = LeNet300100()
    batch = (torch.rand(16, 64), torch.randint(0, 10, (16,)))
    spec = PruningSpec(model, "snip")
    stats = spec.statistics([batch], None)
    spec.criterion.prepare(model, spec.targets, stats)
    total = sum(float(spec.criterion.score(t, stats[t.name]).sum()) for t in spec.targets)
    assert total == pytest.approx(1.0, abs=1e-5)


def _two_layer(bias1=None):
    return nn.Sequential(_linear([[1.0, -2.0], [3.0, 0.5]], bias1), nn.ReLU(), _linear([[-1.0, 2.0]]))


def test_synflow_scores_match_the_path_product_formula():
    # R = sum_i |W2_i| (sum_j |W1_ij| + |b1_i|); dR/d|W1_ij| = |W2_i|; dR/d|W2_i| = sum_j |W1_ij| + |b1_i|
    model = _two_layer()
    targets = resolve_targets(model)
    scores = SynFlow(input_shape=(2,)).scores(model, targets)
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[1.0, 2.0], [6.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(scores["2.weight"], torch.tensor([[3.0, 7.0]], dtype=torch.float64))

    with_bias = _two_layer(bias1=[-1.0, 0.0])
    scores = SynFlow(input_shape=(2,)).scores(with_bias, resolve_targets(with_bias))
    torch.testing.assert_close(scores["2.weight"], torch.tensor([[4.0, 7.0]], dtype=torch.float64))
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[1.0, 2.0], [6.0, 1.0]], dtype=torch.float64))


def test_synflow_masked_weights_carry_no_flow():
    model = _two_layer()
    pk.prune(model, 0.25, method="magnitude", targets=["0"])  # 0.5 goes (|W1| = 1, 2, 3, 0.5)
    scores = SynFlow(input_shape=(2,)).scores(model, resolve_targets(model))
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[1.0, 2.0], [6.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(scores["2.weight"], torch.tensor([[3.0, 6.0]], dtype=torch.float64))


def test_round_sparsities_shrink_the_kept_fraction_geometrically():
    model = LeNet300100()
    spec = PruningSpec(model, SynFlow(rounds=4))
    assert _round_sparsities(spec, 0.9375) == pytest.approx([0.5, 0.75, 0.875, 0.9375])
    pk.prune(model, 0.5, scope="local")  # start from what is kept now: 0.5 -> 0.0625 in 3 halvings of 4 rounds
    spec = PruningSpec(model, SynFlow(rounds=3))
    assert _round_sparsities(spec, 0.9375) == pytest.approx([0.75, 0.875, 0.9375])
    assert PruningSpec(model, "magnitude").criterion.rounds == 1


def test_synflow_prunes_in_rounds_without_touching_the_model_and_keeps_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10),
    )
    model.train()
    before = copy.deepcopy(model.state_dict())
    loader = [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
    report = pk.prune(model, 0.99, method="synflow", data=loader)
    assert report.sparsity == pytest.approx(0.99, abs=1e-3)
    assert model.training  # mode untouched; BatchNorm statistics untouched
    for key in ("1.running_mean", "1.running_var", "4.running_var", "1.weight"):
        torch.testing.assert_close(model.state_dict()[key], before[key])
    for name, mask in pk.masks(model).items():
        original = before[name]
        value = model.get_submodule(name.rpartition(".")[0]).weight.detach()
        assert torch.equal(value[mask], original[mask])  # signs and values of kept weights restored
        assert mask.any(), f"{name} was emptied"  # no layer collapse at 99% (Tanaka et al.)


def test_synflow_at_extreme_sparsity_keeps_a_path_where_one_shot_magnitude_collapses_a_layer():
    torch.manual_seed(0)
    model = LeNet5()
    baseline = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="pruned to 100%"):
        pk.prune(baseline, 0.995, method="magnitude")  # global magnitude at init empties the fc layers
    assert int(pk.masks(baseline)["fc2.weight"].sum()) == 0
    pk.prune(model, 0.995, method="synflow", data=[(torch.ones(1, 1, 8, 8), None)])
    kept = {n: int(m.sum()) for n, m in pk.masks(model).items()}
    assert all(v > 0 for v in kept.values()), kept
    with torch.no_grad():  # the flow still reaches the output: the pruned network is connected
        assert float(SynFlow(input_shape=(1, 8, 8)).scores(model, resolve_targets(model))["fc3.weight"].sum()) > 0


def test_init_time_methods_refuse_bad_input_before_changing_anything():
    model = LeNet5()
    with pytest.raises(ValueError, match="synflow needs the input shape"):
        pk.prune(model, 0.9, method="synflow")
    with pytest.raises(ValueError, match="data-driven"):
        pk.prune(model, 0.9, method="snip")
    with pytest.raises(ValueError, match="does not fit the model"):
        pk.prune(model, 0.9, method=SynFlow(input_shape=(3, 5)))
    with pytest.raises(ValueError, match="rounds"):
        SynFlow(rounds=0)
    with pytest.raises(ValueError, match="did you mean 'synflow'"):
        pk.prune(model, 0.9, method="synflo")
    assert pk.masks(model) == {}
    assert "snip" in pk.criteria.CRITERIA and isinstance(pk.criteria.get_criterion("snip"), SNIP)
