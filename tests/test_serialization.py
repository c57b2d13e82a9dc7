"""pk.save / pk.load: safetensors with masks, onto fresh models, atomically, without pickle."""


import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import prunekit as pk
from prunekit import masking


def net():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 10))


def trained_pruned():
    model = net()
    model.train()
    model(torch.randn(4, 3, 8, 8))  # non-trivial BatchNorm running statistics
    pk.prune(model, 0.7)
    pk.prune(model, 0.5, targets=["4.bias"], scope="local")
    return model


def test_round_trip_onto_a_fresh_unpruned_model(tmp_path):
    model = trained_pruned()
    path = pk.save(model, tmp_path / "model.safetensors")
    fresh = net()
    pk.load(fresh, path)
    assert set(pk.masks(fresh)) == set(pk.masks(model)) == {"0.weight", "4.weight", "4.bias"}
    for name, mask in pk.masks(model).items():
        assert torch.equal(pk.masks(fresh)[name], mask)
    theirs = fresh.state_dict()
    assert set(theirs) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    model.eval(), fresh.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), fresh(x))


def test_file_is_a_plain_checkpoint_too(tmp_path):
    model = trained_pruned()
    pk.save(model, tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    plain = {k: v for k, v in tensors.items() if not k.startswith("__mask__.")}
    other = net()
    other.load_state_dict(plain)  # clean names, pruned entries stored as zeros
    assert (other[0].weight[~pk.masks(model)["0.weight"]] == 0).all()


def test_load_replaces_existing_masks(tmp_path):
    model = trained_pruned()
    pk.save(model, tmp_path / "m.safetensors")
    other = net()
    pk.prune(other, 0.9, method="random")
    pk.load(other, tmp_path / "m.safetensors")
    assert torch.equal(pk.masks(other)["0.weight"], pk.masks(model)["0.weight"])


def test_tied_weights_round_trip(tmp_path):
    def tied():
        m = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        m[2].weight = m[0].weight
        return m

    model = tied()
    pk.prune(model, 0.5, targets=["0.weight"])
    pk.save(model, tmp_path / "t.safetensors")
    fresh = tied()
    pk.load(fresh, tmp_path / "t.safetensors")
    assert fresh[0].parametrizations.weight.original is fresh[2].parametrizations.weight.original
    x = torch.randn(3, 6)
    assert torch.equal(fresh(x), model(x))


def test_load_errors_leave_the_model_alone(tmp_path):
    model = trained_pruned()
    pk.save(model, tmp_path / "m.safetensors")
    wrong = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ValueError, match=r"0.weight: the file has shape \(6, 3, 3, 3\), the model \(4, 3, 3, 3\)"):
        pk.load(wrong, tmp_path / "m.safetensors")
    assert pk.masks(wrong) == {}
    assert all(torch.equal(v, before[k]) for k, v in wrong.state_dict().items())
    with pytest.raises(FileNotFoundError):
        pk.load(net(), tmp_path / "missing.safetensors")


def test_save_is_atomic_and_validates(tmp_path):
    model = trained_pruned()
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"previous contents")
    with pytest.raises(ValueError, match="unknown format 'zip'"):
        pk.save(model, target, format="zip")
    assert target.read_bytes() == b"previous contents"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pk.save(model, tmp_path / "no" / "such" / "dir.safetensors")
    pk.save(model, target)
    assert target.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind


def test_finalized_model_saves_without_masks(tmp_path):
    model = trained_pruned()
    sparsity = pk.sparsity(model, per_layer=True)
    pk.finalize(model)
    pk.save(model, tmp_path / "f.safetensors")
    fresh = net()
    pk.load(fresh, tmp_path / "f.safetensors")
    assert pk.masks(fresh) == {}
    zeros = float((fresh[0].weight == 0).float().mean())
    assert zeros == pytest.approx(sparsity["0.weight"])
    assert masking.masks(model) == {}
