"""The foundation's promises on a real task: LeNet-300-100 on scikit-learn's digits (seeded).

- iterative magnitude pruning with fine-tuning to 90% loses at most 1 point of test accuracy;
- at 90% without fine-tuning, magnitude is clearly better than random;
- at 95% (iterative pruning with fine-tuning, the standard protocol), global is at least as good as
  local. Without fine-tuning both collapse to near chance at 95% on this small network, so that
  comparison says nothing.
"""

import copy

import pytest
import torch

import prunekit as pk
from prunekit.data import digits, evaluate, loaders, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(lenet_digits):
    """The session's trained LeNet-300-100 (the tests copy it before changing it), loaders and its accuracy."""
    train_loader, test_loader = loaders(*digits(), batch_size=64, seed=0)
    return lenet_digits.model, train_loader, test_loader, lenet_digits.accuracy


def test_dense_baseline_is_a_real_classifier(setup):
    _, _, _, dense = setup
    assert dense > 0.94


def test_iterative_pruning_with_fine_tuning_to_90_percent_loses_at_most_one_point(setup):
    dense_model, train_loader, test_loader, dense = setup
    model = copy.deepcopy(dense_model)
    steps_per_epoch = len(train_loader)
    pruner = pk.Pruner(model, pk.schedules.Iterative(final=0.9, steps=3, every=2 * steps_per_epoch))
    torch.manual_seed(1)
    train(model, train_loader, epochs=8, lr=5e-4, callback=lambda step: pruner.step())
    assert pk.sparsity(model) == pytest.approx(0.9, abs=1e-3)
    accuracy = evaluate(model, test_loader)
    assert accuracy >= dense - 0.01, (accuracy, dense)
    # Han et al.: the weights are really gone, 10x fewer non-zeros in the pruned layers
    assert pk.metrics.compression_ratio(model) > 6  # biases count too, so below 10


def test_magnitude_beats_random_at_90_percent_without_fine_tuning(setup):
    dense_model, _, test_loader, _ = setup
    results = {}
    for method in ("magnitude", "random"):
        model = copy.deepcopy(dense_model)
        pk.prune(model, 0.9, method=method, scope="local")
        results[method] = evaluate(model, test_loader)
    assert results["magnitude"] > results["random"] + 0.3, results


def test_global_at_least_as_good_as_local_at_95_percent(setup):
    dense_model, train_loader, test_loader, _ = setup
    results = {}
    for scope in ("global", "local"):
        model = copy.deepcopy(dense_model)
        every = 2 * len(train_loader)
        pruner = pk.Pruner(model, pk.schedules.Iterative(final=0.95, steps=5, every=every), scope=scope)
        torch.manual_seed(1)
        train(model, train_loader, epochs=14, lr=1e-3, callback=lambda step: pruner.step())
        assert pk.sparsity(model) == pytest.approx(0.95, abs=1e-3)
        results[scope] = evaluate(model, test_loader)
    assert results["global"] >= results["local"], results
