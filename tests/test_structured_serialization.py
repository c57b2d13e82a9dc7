"""pk.save / pk.load of physically pruned models: the file records the new shapes, and a fresh instance
of the original architecture is resized before the values are loaded. No pickle anywhere."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from structured_models import DepthwiseNet, MHANet, NormsNet, TiedNet

import prunekit as pk
from prunekit.models import resnet20, vgg_small
from prunekit.structured import PrunedMultiheadAttention, RemovedBlock, remove_blocks


def _roundtrip(make, model, x, tmp_path, **save_kwargs):
    model.eval()
    with torch.no_grad():
        expected = model(x)
    path = pk.save(model, tmp_path / "pruned.safetensors", **save_kwargs)
    fresh = make().eval()
    pk.load(fresh, path)
    with torch.no_grad():
        got = fresh(x)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    return fresh, path


def test_pruned_resnet_with_removed_blocks_loads_onto_a_fresh_instance(tmp_path):
    torch.manual_seed(0)
    model = resnet20()
    x = torch.randn(2, 3, 16, 16)
    removed = remove_blocks(model, x, 2)
    pk.structured.prune(model, x, 0.5, method="l2", round_to=4)
    fresh, path = _roundtrip(resnet20, model, x, tmp_path)
    for name in removed:
        assert isinstance(fresh.get_submodule(name), RemovedBlock)
    assert fresh.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels == 8
    assert fresh.layer1[0].bn1.num_features == 8
    with safe_open(str(path), framework="pt") as handle:
        record = json.loads(handle.metadata()["prunekit_structure"])
    assert record["modules"]["layer1.0.conv1"]["attributes"] == {"in_channels": 8, "out_channels": 8, "groups": 1}
    assert record["modules"]["layer1.0.conv1"]["tensors"] == {"weight": [8, 8, 3, 3]}
    assert sorted(record["removed_blocks"]) == sorted(removed)


@pytest.mark.parametrize("make,x", [(DepthwiseNet, torch.randn(2, 3, 6, 6)), (NormsNet, torch.randn(2, 3, 6, 6)),
                                    (MHANet, torch.randn(2, 5, 5)), (TiedNet, torch.randint(0, 20, (2, 7)))])
def test_pruned_op_models_roundtrip(make, x, tmp_path):
    torch.manual_seed(0)
    model = make()
    pk.structured.prune(model, x, 0.5)
    fresh, _ = _roundtrip(make, model, x, tmp_path)
    if make is MHANet:
        assert isinstance(fresh.attn, PrunedMultiheadAttention) and fresh.attn.num_heads == 2
    if make is TiedNet:
        assert fresh.head.weight is fresh.emb.weight


def test_masks_survive_together_with_the_structure(tmp_path):
    torch.manual_seed(0)
    model = vgg_small()
    x = torch.randn(2, 3, 16, 16)
    pk.structured.prune(model, x, 0.5)
    pk.prune(model, 0.5, method="magnitude", scope="global")
    fresh, _ = _roundtrip(vgg_small, model, x, tmp_path)
    assert pk.sparsity(fresh) == pytest.approx(pk.sparsity(model))
    assert pk.masks(fresh)["features.0.weight"].shape == (16, 3, 3, 3)


def test_structure_and_sparse_format_together(tmp_path):
    torch.manual_seed(0)
    model = vgg_small()
    x = torch.randn(2, 3, 16, 16)
    pk.structured.prune(model, x, 0.5)
    pk.prune(model, 0.8, method="magnitude", scope="global")
    fresh, path = _roundtrip(vgg_small, model, x, tmp_path, format="sparse")
    assert pk.masks(fresh).keys() == pk.masks(model).keys()
    assert all(torch.equal(pk.masks(fresh)[k], m) for k, m in pk.masks(model).items())
    meta = pk.serialization.read_metadata(path)
    assert meta["format"] == "sparse" and "prunekit_structure" in meta
    dense = pk.save(model, tmp_path / "dense.safetensors")
    # 80% of the weights are gone: 0.2 x 4 bytes + a 1/8-byte bitmask per weight against 4 + 1 (the bool mask)
    assert path.stat().st_size < 0.25 * dense.stat().st_size


def test_loading_onto_the_wrong_architecture_is_refused_before_any_change(tmp_path):
    model = vgg_small()
    pk.structured.prune(model, torch.randn(1, 3, 16, 16), 0.5)
    path = pk.save(model, tmp_path / "vgg.safetensors")
    other = resnet20()
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this model"):
        pk.load(other, path)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())


def test_unpruned_models_get_no_structure_record(tmp_path):
    path = pk.save(vgg_small(), tmp_path / "dense.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert "prunekit_structure" not in handle.metadata()
