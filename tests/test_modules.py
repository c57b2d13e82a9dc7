"""The nn.Module facts stated once in prunekit.modules, and the number formatters of prunekit._format."""

import pytest
import torch
from torch import nn

import prunekit as pk

from prunekit._format import format_percent, format_ratio, format_seconds
from prunekit.modules import (
    call_model,
    eval_mode,
    fraction_pruned,
    matches,
    named_persistent_buffers,
    replace_module,
    split_inputs,
    training_mode,
)


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("fc1", "fc1", True),
        ("fc1.weight", "fc1", True),  # a module names what it holds
        ("fc10", "fc1", False),  # ... but not a sibling whose name starts the same
        ("features.0.weight", "features.*", True),  # a glob's * crosses dots
        ("features.0", "*.0", True),
        ("Features.0", "features.*", False),  # case matters
        ("a[1]", "a[1]", True),  # the exact name wins over reading [1] as a character class
    ],
)
def test_matches_names_modules_globs_and_what_they_hold(name, pattern, expected):
    assert matches(name, pattern) is expected


def test_matches_without_inside_is_the_name_or_glob_only():
    assert not matches("fc1.weight", "fc1", inside=False)
    assert matches("fc1.weight", "fc1.weight", inside=False)
    assert matches("fc1.weight", "fc*.weight", inside=False)


def test_eval_mode_restores_every_module_own_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
    with pytest.raises(RuntimeError), training_mode(model, False):
        raise RuntimeError("restored on error too")
    assert [m.training for m in model.modules()] == [True, True, False, True]
    model.eval()
    with training_mode(model, True):
        assert all(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())


class _Add(nn.Module):
    def forward(self, x, y=0):
        return x + y


def test_call_model_reads_tensor_tuple_and_mapping():
    x, y = torch.tensor([1.0]), torch.tensor([2.0])
    assert split_inputs(x) == ((x,), {})
    assert torch.equal(call_model(_Add(), x), x)
    assert torch.equal(call_model(_Add(), (x, y)), x + y)
    assert torch.equal(call_model(_Add(), {"x": x, "y": y}), x + y)


def test_replace_module_swaps_the_dotted_child_and_returns_the_old_one():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    old = model[0][0]
    new = nn.Identity()
    assert replace_module(model, "0.0", new) is old
    assert model[0][0] is new
    with pytest.raises(ValueError, match="root"):
        replace_module(model, "", nn.Identity())


def test_fraction_pruned_counts_zeros():
    assert fraction_pruned(None) == 0.0
    assert fraction_pruned(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])) == pytest.approx(3 / 5)


def test_formatters():
    assert format_seconds(0.000231) == "231 µs"
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(2.5) == "2.5 s"
    assert format_seconds(None) == "-"
    assert format_ratio(9.32) == "9.3×"
    assert format_ratio(float("inf")) == "∞"
    assert format_percent(0.9123) == "91.2%"


def test_named_persistent_buffers_are_what_the_state_dict_holds_minus_the_masks():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].register_buffer("scratch", torch.zeros(1), persistent=False)
    pk.prune(model, 0.5, targets=["0"])
    names = [name for name, _ in named_persistent_buffers(model)]
    assert names == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert any(".parametrizations." in name for name, _ in model.named_buffers())  # the mask: not listed
