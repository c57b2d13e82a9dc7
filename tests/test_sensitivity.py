"""pk.sensitivity: each layer pruned alone; the allocation it feeds beats uniform sparsity."""

import copy
import io

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk
from prunekit.data import digits, evaluate, loaders, train
from prunekit.models import LeNet5
from prunekit.sensitivity_analysis import SensitivityResult, allocate


def synthetic(curves, sizes, sparsities=(0.5, 0.9), baseline=1.0):
    return SensitivityResult(list(sparsities), {k: [baseline - l for l in v] for k, v in curves.items()},
                             baseline, sizes)


# --- allocation, checked by hand ------------------------------------------------------------------


def test_allocation_walks_the_cheapest_steps_and_lands_on_the_target():
    # Losses at 50% / 90%: A 0.0 / 0.1, B 0.2 / 0.3; 100 weights each, target 50% = 100 weights.
    # Cost per pruned weight from (0, 0): A->50% 0, so first; then A 50->90% 0.1/40 = 0.0025 beats
    # B->90% 0.3/90 = 0.0033 and B->50% 0.2/50 = 0.004; then B->90% (0.0033), stopped after 10 weights.
    result = synthetic({"A": [0.0, 0.1], "B": [0.2, 0.3]}, {"A": 100, "B": 100})
    plan = allocate(result, sparsity=0.5)
    assert plan == pytest.approx({"A": 0.9, "B": 0.1})
    assert (100 * plan["A"] + 100 * plan["B"]) / 200 == pytest.approx(0.5)


def test_large_layers_take_the_budget_when_losses_are_equal():
    result = synthetic({"big": [0.01, 0.02], "small": [0.01, 0.02]}, {"big": 900, "small": 100})
    plan = allocate(result, sparsity=0.81)  # 810 weights: all from big, which gains 9x more per step
    assert plan == pytest.approx({"big": 0.9, "small": 0.0})


def test_max_loss_alone_is_distillers_rule():
    result = synthetic({"A": [0.005, 0.02], "B": [0.03, 0.5], "C": [0.0, 0.0]}, {"A": 10, "B": 10, "C": 10})
    assert allocate(result, max_loss=0.01) == {"A": 0.5, "B": 0.0, "C": 0.9}
    # with a target too: the greedy walk never passes a layer's max_loss point
    assert allocate(result, sparsity=0.45, max_loss=0.01) == pytest.approx({"A": 0.45, "B": 0.0, "C": 0.9})
    with pytest.raises(ValueError, match="at most 0.4667"):
        allocate(result, sparsity=0.6, max_loss=0.01)


def test_noisy_curves_never_reward_more_pruning_and_lower_is_better_metrics():
    # a perplexity: higher is worse; the dip at 90% is noise and is not believed
    result = SensitivityResult([0.5, 0.9], {"A": [10.0, 9.0], "B": [11.0, 30.0]}, 10.0, {"A": 10, "B": 10},
                               higher_is_better=False)
    assert result.losses() == {"A": [0.0, -1.0], "B": [1.0, 20.0]}
    assert allocate(result, sparsity=0.45) == pytest.approx({"A": 0.9, "B": 0.0})


def test_allocation_errors():
    result = synthetic({"A": [0.0, 0.1]}, {"A": 10})
    with pytest.raises(ValueError, match="needs sparsity="):
        allocate(result)
    with pytest.raises(ValueError, match="max_loss must be a number >= 0"):
        allocate(result, max_loss=-1)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        allocate(result, sparsity=1.5)


def test_result_round_trips_through_json(tmp_path):
    result = synthetic({"A": [0.0, 0.1], "B": [0.2, 0.3]}, {"A": 100, "B": 50})
    path = result.save(tmp_path / "s.json")
    again = SensitivityResult.load(path)
    assert again == result
    with pytest.raises(ValueError, match="not a sensitivity result"):
        SensitivityResult.from_dict({"curves": {}})


# --- the analysis ---------------------------------------------------------------------------------


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_each_layer_is_pruned_alone_on_a_copy():
    model = small_model()
    pk.prune(model, 0.25, targets=["2"], scope="local")  # an already pruned layer keeps what it has
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 6)
    seen = []

    def record(m):  # the metric: the model's per-layer sparsities, so each call can be checked exactly
        seen.append(pk.sparsity(m, per_layer=True))
        return float(m(x).sum().detach())

    result = pk.sensitivity(model, record, [0.5, 0.75], progress=False)
    assert result.sparsities == [0.5, 0.75] and list(result.curves) == ["0.weight", "2.weight"]
    assert result.sizes == {"0.weight": 48, "2.weight": 24}
    assert seen[0] == {"2.weight": 0.25}  # the baseline: the model as given
    assert seen[1] == {"0.weight": 0.5, "2.weight": 0.25}
    assert seen[2] == {"0.weight": 0.75, "2.weight": 0.25}
    assert seen[3] == {"0.weight": 0.0, "2.weight": 0.5}  # 0.weight was put back (an all-kept mask)
    assert seen[4] == {"0.weight": 0.0, "2.weight": 0.75}
    # the metric values are those of the model pruned by hand the same way
    by_hand = copy.deepcopy(model)
    pk.prune(by_hand, 0.75, targets=["0"], scope="local")
    assert result.curves["0.weight"][1] == pytest.approx(float(by_hand(x).sum().detach()))
    # the user's model is untouched
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert set(pk.masks(model)) == {"2.weight"}


def test_progress_bar_and_validation():
    model = small_model()
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    pk.sensitivity(model, lambda m: 1.0, [0.5], console=console)
    assert "sensitivity analysis done" in out.getvalue()
    with pytest.raises(ValueError, match="unknown method 'magnitud'; did you mean 'magnitude'"):
        pk.sensitivity(model, lambda m: 1.0, [0.5], method="magnitud")
    with pytest.raises(ValueError, match="fixes the sparsity"):
        pk.sensitivity(nn.Linear(8, 4), lambda m: 1.0, [0.5], granularity="2:4")
    with pytest.raises(ValueError, match="at least one value"):
        pk.sensitivity(model, lambda m: 1.0, [0.0])
    with pytest.raises(ValueError, match="data-driven"):
        pk.sensitivity(model, lambda m: 1.0, [0.5], method="taylor")
    with pytest.raises(TypeError, match="must return a number"):
        pk.sensitivity(model, lambda m: "good", [0.5], progress=False)


def test_data_driven_methods_take_calibration_data():
    model = small_model()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    batches = [(x, y)]
    result = pk.sensitivity(model, lambda m: float(m(x).argmax(1).eq(y).float().mean()), [0.5], method="taylor",
                            data=batches, progress=False)
    assert result.method == "taylor" and set(result.curves) == {"0.weight", "2.weight"}


# --- the acceptance test: LeNet-5 on digits ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained_lenet():
    torch.manual_seed(0)
    train_set, test_set = digits(image=True)
    x, y = train_set.tensors
    fit, val = TensorDataset(x[:-360], y[:-360]), TensorDataset(x[-360:], y[-360:])  # analyse on held-out data
    train_loader, test_loader = loaders(fit, test_set, 64, seed=0)
    model = LeNet5()
    train(model, train_loader, epochs=15, lr=3e-3)
    return model, DataLoader(val, batch_size=360), test_loader


def test_sensitivity_allocation_beats_uniform_sparsity_on_lenet5_digits(trained_lenet):
    model, val_loader, test_loader = trained_lenet
    dense_accuracy = evaluate(model, test_loader)
    assert dense_accuracy > 0.9
    result = pk.sensitivity(model, lambda m: evaluate(m, val_loader), [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
                            progress=False)
    # the first convolution (150 weights) is far more fragile than the large fully connected layers
    at_90 = result.sparsities.index(0.9)
    assert result.curves["conv1.weight"][at_90] < result.curves["fc2.weight"][at_90]
    for target in (0.8, 0.9):
        plan = result.allocate(sparsity=target)
        allocated, uniform = copy.deepcopy(model), copy.deepcopy(model)
        pk.prune(allocated, scope=plan)  # a per-layer dict scope
        pk.prune(uniform, target, scope="local")  # every layer at the same sparsity
        assert pk.sparsity(allocated) == pytest.approx(target, abs=1e-3)
        assert pk.sparsity(uniform) == pytest.approx(target, abs=1e-3)
        acc_allocated, acc_uniform = evaluate(allocated, test_loader), evaluate(uniform, test_loader)
        assert acc_allocated > acc_uniform + 0.05, (target, acc_allocated, acc_uniform)
        # the scope object gives the same masks as the dict
        scoped = copy.deepcopy(model)
        pk.prune(scoped, target, scope=result.scope())
        assert all(torch.equal(pk.masks(scoped)[k], m) for k, m in pk.masks(allocated).items())
