"""A masked model's state_dict has the dense keys (masks marked as -0.0) and loads everywhere."""

import copy
import io

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import masking


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def pruned():
    model = mlp()
    pk.prune(model, 0.5, scope="local")
    return model


def test_keys_are_the_dense_models_and_pruned_entries_are_marked():
    model = pruned()
    state = model.state_dict()
    assert list(state) == list(mlp().state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name, mask in pk.masks(model).items():
        value = state[name]
        assert torch.equal(masking.marks(value), ~mask)  # -0.0 exactly where pruned
        assert not torch.signbit(value[mask & (value == 0)]).any()
        assert torch.equal(value, getattr(model[int(name[0])], "weight"))  # the values the model computes with


def test_plain_load_state_dict_into_a_fresh_model_computes_the_same():
    model = pruned()
    fresh = mlp()
    result = fresh.load_state_dict(model.state_dict())  # strict, no prunekit involved
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), model(x))
    assert pk.masks(fresh) == {}
    restored = pk.restore_masks(fresh)
    assert set(restored) == {"0.weight", "2.weight"}
    for name, mask in pk.masks(model).items():
        assert torch.equal(pk.masks(fresh)[name], mask)


def test_torch_save_round_trip_through_bytes():
    model = pruned()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = mlp()
    masking.load_masked_state_dict(fresh, state)
    for name, mask in pk.masks(model).items():
        assert torch.equal(pk.masks(fresh)[name], mask)
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), model(x))


def test_masked_model_loads_a_masked_state_dict_with_its_masks():
    source = pruned()
    target = mlp()
    pk.prune(target, 0.9, method="random")
    target.load_state_dict(source.state_dict())
    for name, mask in pk.masks(source).items():
        assert torch.equal(pk.masks(target)[name], mask)  # replaced, not tightened: entries came back
    x = torch.randn(5, 8)
    assert torch.equal(target(x), source(x))


def test_masked_model_loads_a_dense_state_dict_and_keeps_its_masks():
    model = pruned()
    masks = {k: v.clone() for k, v in pk.masks(model).items()}
    dense = mlp()
    model.load_state_dict(dense.state_dict())  # rewinding to other weights, torch.nn.utils.prune-style
    for name, mask in masks.items():
        assert torch.equal(pk.masks(model)[name], mask)
        raw = masking.raw_parameter(model[int(name[0])], "weight")
        expected = dense.state_dict()[name] * mask
        assert torch.equal(raw, expected)  # stored pruned entries zero, kept ones loaded


def test_missing_masked_weight_is_reported_by_its_dense_name():
    model = pruned()
    state = mlp().state_dict()
    del state["2.weight"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "2.weight"'):
        model.load_state_dict(state)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["2.weight"]


def test_deepcopy_and_tied_weights_keep_dense_keys():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    model[2].weight = model[0].weight
    pk.prune(model, 0.5, scope="local")
    clone = copy.deepcopy(model)
    state = clone.state_dict()
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    fresh = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    fresh[2].weight = fresh[0].weight
    fresh.load_state_dict(state)
    x = torch.randn(3, 6)
    assert torch.equal(fresh(x), model(x))


def test_a_kept_zero_is_not_taken_for_a_pruned_entry():
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = -0.0  # kept, and exactly zero with the sign bit
    mask = torch.ones(16, 8, dtype=torch.bool)
    mask[1, 1] = False
    masking.attach(model, "0.weight", mask)
    fresh = mlp()
    masking.load_masked_state_dict(fresh, model.state_dict())
    assert torch.equal(pk.masks(fresh)["0.weight"], mask)


def test_sparsity_counts_zeros_after_finalize_and_reload():
    model = pruned()
    assert pk.sparsity(model) == pk.sparsity(model, count="masks") == 0.5
    fresh = mlp()
    fresh.load_state_dict(model.state_dict())
    assert pk.sparsity(fresh, count="masks") == 0.0  # no masks on the plain model
    assert pk.sparsity(fresh) == pk.sparsity(fresh, count="zeros") == 0.5  # but half its weights are zero
    pk.finalize(model)
    assert pk.sparsity(model) == 0.5
    assert pk.sparsity(model, per_layer=True) == {"0.weight": 0.5, "2.weight": 0.5}  # biases: 1-D, unmasked
    with pytest.raises(ValueError, match="count must be one of auto, masks, zeros"):
        pk.sparsity(model, count="nonzero")


def test_summary_rows_count_weight_and_bias_together():
    model = pruned()
    per_param = pk.sparsity(model, per_layer=True, count="zeros")
    rows = {r["name"]: r for r in pk.summary(model, print_table=False)}
    for layer in ("0", "2"):
        weight, bias = model[int(layer)].weight, model[int(layer)].bias
        zeros = per_param[f"{layer}.weight"] * weight.numel() + int((bias == 0).sum())
        assert rows[layer]["sparsity"] == pytest.approx(zeros / (weight.numel() + bias.numel()))


def test_finalize_after_a_state_dict_leaves_plain_zeros(tmp_path):
    model = pruned()
    model.state_dict()  # marks the pruned entries (-0.0) in place, as any checkpoint does
    pk.finalize(model)
    for name in ("0.weight", "2.weight"):
        value = model.get_parameter(name).detach()
        assert not masking.marks(value).any() and (value == 0).float().mean() == 0.5
    # so the sparse file of the finalized model stores only the non-zeros
    reference = pruned()
    pk.finalize(reference)
    a = pk.save(model, tmp_path / "a.safetensors", format="sparse")
    b = pk.save(reference, tmp_path / "b.safetensors", format="sparse")
    assert a.stat().st_size == b.stat().st_size
