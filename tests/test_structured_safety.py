"""Structured pruning never leaves a model broken: subclasses that compute something else get no rule from
their parent, parameters used directly follow their channels or pin them, and a surgery that fails half-way
restores the model exactly (failures injected mid-surgery)."""

from __future__ import annotations

import pytest
import torch
from structured_models import (
    GainStdConv2d,
    LayerNorm2d,
    MHANet,
    PositionNet,
    RopeAttentionNet,
    ScaledStdConv2d,
    StandardisedNet,
    StdConv2d,
)
from test_structured_graph import check_equivalence
from torch import nn

import prunekit as pk
from prunekit.models import resnet8
from prunekit.structured import DependencyGraph, PrunedMultiheadAttention, UnsupportedOperationError
from prunekit.structured.rules import base as rules_base
from prunekit.structured.rules import module_rule, shape_rule


def test_a_subclass_with_its_own_forward_gets_no_rule_from_its_parent():
    for module, parent in ((LayerNorm2d(4), nn.LayerNorm(4)), (StdConv2d(3, 4, 3), nn.Conv2d(3, 4, 3)),
                           (ScaledStdConv2d(3, 4, 3), nn.Conv2d(3, 4, 3)), (GainStdConv2d(3, 4, 3), nn.Conv2d(3, 4, 3))):
        assert module_rule(module) is None
        # its size attributes are still its parent's (resized after surgery)
        assert shape_rule(module) is shape_rule(parent) is not None
    linear = nn.Linear(4, 4)
    pk.prune(linear, 0.5, targets=[""], scope="local")  # a masked Linear is a subclass running Linear.forward
    assert type(linear) is not nn.Linear and module_rule(linear) == module_rule(nn.Linear(1, 1))
    assert module_rule(nn.SyncBatchNorm(3)).rule is module_rule(nn.BatchNorm2d(3)).rule
    assert module_rule(PrunedMultiheadAttention(8, 2)).rule is module_rule(nn.MultiheadAttention(8, 2)).rule


def test_standardised_convolutions_and_channels_first_norm_are_traced_into():
    model = StandardisedNet()
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    groups = {g.name: {m.name for m in g.members} for g in graph.groups()}
    # a standardised filter depends on its whole row: its output channel goes exactly, with its gain
    assert groups == {
        "ws": {"ws.weight", "ws.bias", "mid.weight"},
        "gained": {"gained.weight", "gained.bias", "gained.gain", "mid2.weight"},
        "conv": {"conv.weight", "conv.bias", "fc.weight"},
    }
    # ... but its input channels are pinned (their removal would change every filter's mean and variance),
    # and so are the channels a channels-first LayerNorm normalises over
    for layer in ("stem", "mid", "mid2", "scaled"):
        with pytest.raises(ValueError, match="not prunable"):
            graph.group_of(layer)
    assert "reduces over dimension 1" in " ".join(b.reason for b in graph.boundaries())
    channels_first = nn.Sequential(nn.Conv2d(3, 6, 1), LayerNorm2d(6), nn.Conv2d(6, 4, 1))
    norm = DependencyGraph(channels_first, x)
    with pytest.raises(ValueError, match="LayerNorm normalises over this dimension"):
        norm.channels_of("0", [0])  # its mean and variance are taken over the channels (dim 1), not W
    assert [g.name for g in norm.groups()] == []
    _, removal, before, after = check_equivalence(StandardisedNet(), x)
    assert len(removal) == 3 and after < before
    # kept whole, a subclass with its own forward is refused by name, never matched to nn.Conv2d's rule
    with pytest.raises(UnsupportedOperationError, match="no rule for module 'ws'.*register a rule for StdConv2d"):
        DependencyGraph(StandardisedNet(), x, leaf_modules=[StdConv2d])


def test_standardised_model_prunes_end_to_end_resizes_attributes_and_reloads(tmp_path):
    model = StandardisedNet().eval()
    x = torch.randn(2, 3, 6, 6)
    report = pk.structured.prune(model, x, 0.5)
    assert report.params_after < report.params_before
    assert model.ws.out_channels == model.ws.weight.shape[0] == 6
    assert model.gained.gain.shape == (4, 1, 1, 1) and model.mid2.in_channels == 4
    pk.save(model, tmp_path / "model.safetensors")
    fresh = StandardisedNet().eval()
    pk.load(fresh, tmp_path / "model.safetensors")
    assert fresh.ws.out_channels == 6 and torch.equal(fresh(x), model(x))


def test_a_bias_concatenated_in_forward_is_never_pruned_on_its_own():
    model = RopeAttentionNet()
    x = torch.randn(2, 5, 6)
    graph = DependencyGraph(model, x)
    members = {g.name: {m.name for m in g.members} for g in graph.groups()}
    assert members == {
        "embed": {"gamma", "embed.weight", "embed.bias", "qkv.weight", "proj.weight", "proj.bias", "fc1.weight",
                  "fc2.weight", "fc2.bias", "head.weight"},  # the layer-scale gamma is part of the residual group
        "fc1": {"fc1.weight", "fc1.bias", "fc2.weight"},
    }
    _, removal, before, after = check_equivalence(RopeAttentionNet(), x)
    assert len(removal) == 2 and after < before
    report = pk.structured.prune(model, x, 0.3)
    assert model.q_bias.shape == (16,) and model.fc1.out_features == 17 and report.params_after < report.params_before


def test_a_position_embedding_follows_its_group_and_an_indexed_bias_table_pins_its_heads():
    model = PositionNet()
    x = torch.randn(2, 4, 5)
    graph = DependencyGraph(model, x)
    members = {g.name: {m.name for m in g.members} for g in graph.groups()}
    assert members == {
        "embed": {"pos", "embed.weight", "embed.bias", "qkv.weight", "o.weight", "o.bias", "fc.weight"},
        "fc": {"fc.weight", "fc.bias", "head.weight"},
    }
    table = [b for b in graph.boundaries() if "advanced (tensor) indexing" in b.reason]
    assert sum(b.channels for b in table) == 7 + 3  # both dimensions of the (2n-1, heads) table
    _, removal, before, after = check_equivalence(PositionNet(), x)
    assert len(removal) == 2 and after < before


def _snapshot(model: nn.Module) -> dict:
    return {
        "modules": [(name, m, type(m), {k: v for k, v in vars(m).items() if not k.startswith("_")},
                     dict(m._parameters), dict(m._buffers), dict(m._modules)) for name, m in model.named_modules()],
        "tensors": {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
    }


def _assert_untouched(model: nn.Module, snapshot: dict) -> None:
    now = list(model.named_modules())
    assert len(now) == len(snapshot["modules"])
    for (name, m), (name0, m0, cls, attributes, params, buffers, children) in zip(now, snapshot["modules"]):
        assert name == name0 and m is m0 and type(m) is cls
        assert {k: v for k, v in vars(m).items() if not k.startswith("_")} == attributes
        assert m._parameters == params and m._buffers == buffers and m._modules == children
    state = model.state_dict(keep_vars=True)
    assert state.keys() == snapshot["tensors"].keys()
    for key, (tensor, values) in snapshot["tensors"].items():
        assert state[key] is tensor and torch.equal(tensor.detach(), values)


def test_a_failure_in_the_middle_of_surgery_restores_the_model_exactly(monkeypatch):
    model = resnet8().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    snapshot = _snapshot(model)
    conv = rules_base._MODULE_RULES[nn.Conv2d]
    calls = []

    def resize_then_fail(module, sizes):
        calls.append(module)
        conv.resize(module, sizes)  # the first layers really change...
        if len(calls) == 3:
            raise RuntimeError("injected failure")

    monkeypatch.setitem(rules_base._MODULE_RULES, nn.Conv2d, rules_base.ModuleRule(conv.rule, resize_then_fail,
                                                                                 conv.attributes))
    with pytest.raises(RuntimeError, match="injected failure"):
        pk.structured.prune(model, x, 0.5)
    assert len(calls) == 3 and calls[0].weight.shape[0] == calls[0].out_channels  # ... and are put back
    _assert_untouched(model, snapshot)
    assert torch.equal(model(x), expected)


def test_a_failure_after_surgery_restores_a_swapped_attention_class(monkeypatch):
    model = MHANet().eval()
    x = torch.randn(2, 5, 5)
    snapshot = _snapshot(model)
    swapped = []

    def fail(model_, mlp):
        swapped.append(type(model_.attn))
        raise RuntimeError("injected failure")

    monkeypatch.setattr("prunekit.structured.api.sync_config", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        pk.structured.prune(model, x, 0.5)
    assert swapped and issubclass(swapped[0], PrunedMultiheadAttention)  # surgery had swapped the class
    _assert_untouched(model, snapshot)
    assert type(model.attn) is nn.MultiheadAttention


def test_a_failure_while_masking_leaves_no_mask(monkeypatch):
    model = resnet8().eval()
    x = torch.randn(2, 3, 8, 8)
    snapshot = _snapshot(model)
    attach = pk.masking.attach
    calls = []

    def attach_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 4:
            raise RuntimeError("injected failure")
        return attach(*args, **kwargs)

    monkeypatch.setattr("prunekit.structured.api.masking.attach", attach_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        pk.structured.prune(model, x, 0.5, physical=False)
    monkeypatch.undo()
    assert pk.masks(model) == {}
    _assert_untouched(model, snapshot)
