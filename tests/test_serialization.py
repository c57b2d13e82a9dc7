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


# --- the file is the truth; corrupt and truncated files; meta-device models ---------------------


def test_load_removes_masks_the_file_does_not_have(tmp_path):
    dense = net()
    dense.eval()
    pk.save(dense, tmp_path / "dense.safetensors")
    model = net()
    pk.prune(model, 0.5, scope="local")
    pk.load(model, tmp_path / "dense.safetensors")
    assert pk.masks(model) == {}
    assert pk.sparsity(model) == 0.0
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), dense(x))


def test_load_of_a_file_masking_some_layers(tmp_path):
    source = net()
    pk.prune(source, 0.7, targets=["4.weight"])
    pk.save(source, tmp_path / "partial.safetensors")
    model = net()
    pk.prune(model, 0.5, scope="local")  # masks 0.weight and 4.weight
    pk.load(model, tmp_path / "partial.safetensors")
    assert set(pk.masks(model)) == {"4.weight"}
    assert torch.equal(pk.masks(model)["4.weight"], pk.masks(source)["4.weight"])
    source.eval(), model.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), source(x))


@pytest.mark.parametrize("format", ["dense", "sparse"])
def test_flipped_bytes_in_the_data_are_detected(tmp_path, format):
    path = pk.save(trained_pruned(), tmp_path / "m.safetensors", format=format)
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0x10  # one bit of the last tensor's data
    path.write_bytes(bytes(raw))
    model = net()
    with pytest.raises(ValueError, match=r"m.safetensors is corrupt: its tensors do not match the checksum"):
        pk.load(model, path)
    assert pk.masks(model) == {}
    if format == "dense":
        pk.load(model, path, verify=False)  # the flag skips the check
    else:  # unchecked, a flipped bit of a packed mask surfaces when decoding, naming the file
        with pytest.raises(ValueError, match=str(path)):
            pk.load(model, path, verify=False)


def test_truncated_file_names_the_file(tmp_path):
    path = pk.save(trained_pruned(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    for cut in (len(data) - 100, 30, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"{path} is not a readable safetensors file"):
            pk.load(net(), path)


def test_load_into_a_meta_model_materialises_it(tmp_path):
    model = trained_pruned()
    model.eval()
    pk.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        empty = net()
    pk.load(empty, tmp_path / "m.safetensors")
    assert not any(t.is_meta for t in empty.state_dict().values())
    empty.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(empty(x), model(x))
    for name, mask in pk.masks(model).items():
        assert torch.equal(pk.masks(empty)[name], mask)


def test_load_into_a_meta_model_refuses_what_it_cannot_fill(tmp_path):
    pk.save(net(), tmp_path / "m.safetensors")
    with torch.device("meta"):
        empty = net()
    with pytest.raises(ValueError, match="meta device: only strict=True"):
        pk.load(empty, tmp_path / "m.safetensors", strict=False)
    empty.register_buffer("cache", torch.zeros(3, device="meta"), persistent=False)
    with pytest.raises(ValueError, match="non-persistent buffer 'cache' is in no file"):
        pk.load(empty, tmp_path / "m.safetensors")
    assert all(t.is_meta for t in empty.parameters())


def test_load_needs_a_module(tmp_path):
    with pytest.raises(TypeError, match="load needs an nn.Module"):
        pk.load("model", tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="save needs an nn.Module"):
        pk.save({"a": torch.zeros(1)}, tmp_path / "m.safetensors")
