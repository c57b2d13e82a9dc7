"""pk.save(format="sparse"): compressed storage, exact round trips, sizes by the formula."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import prunekit as pk
from prunekit import metrics, sparse_format
from prunekit.models import LeNet300100
from prunekit.serialization import read_metadata


def bits(t: torch.Tensor) -> torch.Tensor:
    return sparse_format._bit_view(t.detach().contiguous())


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    """Same masks, and every state-dict entry equal bit for bit."""
    assert set(pk.masks(a)) == set(pk.masks(b))
    for name, mask in pk.masks(a).items():
        assert torch.equal(pk.masks(b)[name], mask), name
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key, value in sa.items():
        assert value.dtype == sb[key].dtype, key
        assert torch.equal(bits(value), bits(sb[key])), key


def encodings(path) -> dict[str, str]:
    meta = json.loads(read_metadata(path)[sparse_format.METADATA_KEY])
    return {name: info["encoding"] for name, info in meta["tensors"].items()}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 64)
        self.mid = nn.Linear(64, 64)
        self.out = nn.Linear(64, 64)
        self.out.weight = self.mid.weight  # tied

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.out(torch.tanh(self.mid(torch.relu(self.fc(x)))))


def trained_net() -> Net:
    model = Net()
    model.train()
    model(torch.randn(8, 4, 8, 8))  # non-trivial BatchNorm statistics
    return model


# --- bit packing --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_bits_matches_numpy(n):
    mask = torch.rand(n) < 0.3
    packed = sparse_format.pack_bits(mask)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy()))
    assert torch.equal(sparse_format.unpack_bits(packed, n), mask)


def test_small_integers_pack_to_their_bit_width():
    values = torch.tensor([0, 3, 1, 2, 3, 0])
    packed = sparse_format.pack_ints(values, 2)
    assert packed.tolist() == [0b00110110, 0b11000000]  # 00 11 01 10 | 11 00 (padding)
    assert torch.equal(sparse_format.unpack_ints(packed, 6, 2), values)


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity,expected", [(0.5, "bitmask"), (0.9, "bitmask"), (0.99, "csr")])
def test_round_trip_is_exact_entry_by_entry(tmp_path, sparsity, expected):
    model = trained_net()
    pk.prune(model, sparsity, scope="local")
    pk.prune(model, 0.5, targets=["fc.bias"], scope="local")  # a masked 1-D tensor too
    path = pk.save(model, tmp_path / "m.safetensors", format="sparse")
    found = encodings(path)
    assert found["fc.weight"] == expected  # (the small conv prefers the bitmask even at 99%)
    assert found["out.weight"] == "alias"  # the tied weight is stored once
    assert found["bn.running_mean"] == "dense"

    fresh = Net()
    pk.load(fresh, path)
    assert_same_model(model, fresh)
    assert fresh.out.parametrizations.weight.original is fresh.mid.parametrizations.weight.original
    model.eval(), fresh.eval()
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(model(x), fresh(x))


def test_sparse_and_dense_files_load_the_same_model(tmp_path):
    model = trained_net()
    pk.prune(model, 0.8)
    dense, sparse = Net(), Net()
    pk.load(dense, pk.save(model, tmp_path / "d.safetensors"))
    pk.load(sparse, pk.save(model, tmp_path / "s.safetensors", format="sparse"))
    assert_same_model(dense, sparse)


@pytest.mark.parametrize("pattern,encoding", [("2:4", "nm"), ("1:4", "nm"), ("2:8", "nm"), ("4:8", "bitmask")])
def test_nm_patterns(tmp_path, pattern, encoding):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Conv1d(32, 16, 3))
    pk.prune(model, granularity=pattern)
    path = pk.save(model, tmp_path / "nm.safetensors", format="sparse")
    assert encodings(path)["0.weight"] == encoding
    n, m = map(int, pattern.split(":"))
    meta = json.loads(read_metadata(path)[sparse_format.METADATA_KEY])["tensors"]["0.weight"]
    if encoding == "nm":
        assert (meta["n"], meta["m"], meta["dim"]) == (n, m, 1)
        stored = load_file(path)
        kept = 64 * 32 * n // m
        assert stored["0.weight::values"].numel() == kept
        assert stored["0.weight::indices"].numel() == math.ceil(kept * math.ceil(math.log2(m)) / 8)
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Conv1d(32, 16, 3))
    pk.load(fresh, path)
    assert_same_model(model, fresh)


def test_nm_detection_along_dim_zero():
    choice = torch.randint(0, 2, (4, 6))  # in each column, one of every 2 rows is kept
    mask = torch.nn.functional.one_hot(choice, 2).permute(0, 2, 1).reshape(8, 6).bool()
    assert sparse_format.find_nm(mask.T) == (1, 2, 1)
    assert sparse_format.find_nm(mask) == (1, 2, 0)
    value = torch.randn(mask.shape) * mask
    encoded, meta = sparse_format.encode({"w": value, "__mask__.w": mask})
    decoded = sparse_format.decode(encoded, meta)
    assert torch.equal(decoded["w"], value) and torch.equal(decoded["__mask__.w"], mask)


def test_finalized_model_round_trip_keeps_every_bit(tmp_path):
    model = LeNet300100(in_features=64)
    pk.prune(model, 0.9, scope="local")
    pk.finalize(model)
    with torch.no_grad():
        model.fc1.weight[0, :4] = torch.tensor([-0.0, 0.0, -1.5, float("inf")])
    path = pk.save(model, tmp_path / "f.safetensors", format="sparse")
    assert encodings(path)["fc1.weight"] == "bitmask"  # zeros found without a mask
    fresh = LeNet300100(in_features=64)
    pk.load(fresh, path)
    assert pk.masks(fresh) == {}
    assert_same_model(model, fresh)
    assert torch.signbit(fresh.fc1.weight[0, 0]) and not torch.signbit(fresh.fc1.weight[0, 1])


def test_unpruned_tensors_without_zeros_stay_dense(tmp_path):
    model = nn.Linear(32, 32)
    path = pk.save(model, tmp_path / "d.safetensors", format="sparse")
    assert encodings(path) == {"weight": "dense", "bias": "dense"}
    fresh = nn.Linear(32, 32)
    pk.load(fresh, path)
    assert_same_model(model, fresh)


def test_half_precision_round_trip(tmp_path):
    model = nn.Linear(64, 64).to(torch.float16)
    pk.prune(model, 0.7)
    path = pk.save(model, tmp_path / "h.safetensors", format="sparse")
    fresh = nn.Linear(64, 64).to(torch.float16)
    pk.load(fresh, path)
    assert_same_model(model, fresh)


# --- sizes --------------------------------------------------------------------------------------


def mlp():
    """About 2 MB of float32 weights, so that the file's header is negligible."""
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))


def kept_and_others(model):
    masks = pk.masks(model)
    kept = {name: int(m.count_nonzero()) for name, m in masks.items()}
    others = sum(t.numel() for name, t in metrics._effective_state_dict(model).items() if name not in masks)
    return kept, others


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
def test_size_follows_the_formula_and_the_smaller_encoding_wins(tmp_path, sparsity):
    model = mlp()
    pk.prune(model, sparsity, scope="local")
    dense = metrics.model_size(model)
    kept, others = kept_and_others(model)
    masks = pk.masks(model)
    column_bytes = {"0.weight": 1, "2.weight": 2}  # uint8 for 256 columns, int16 for 1024
    expected_bytes, expected_encoding = 4 * others, {}
    for name, k in kept.items():
        bitmask = 4 * k + math.ceil(masks[name].numel() / 8)
        csr = (4 + column_bytes[name]) * k + 4 * (masks[name].shape[0] + 1)
        expected_bytes += min(bitmask, csr)
        expected_encoding[name] = "bitmask" if bitmask <= csr else "csr"
    path = pk.save(model, tmp_path / "s.safetensors", format="sparse")
    assert {n: encodings(path)[n] for n in kept} == expected_encoding
    ratio = metrics.file_size(path) / dense
    assert ratio == pytest.approx(expected_bytes / dense, rel=0.10)
    if sparsity <= 0.8:  # the bitmask everywhere: 1 - sparsity of dense plus 1/32 for the bits
        assert set(expected_encoding.values()) == {"bitmask"}
    assert ratio == pytest.approx((1 - sparsity) + 1 / 32, rel=0.10)  # at 90%: close to 10% + 1/32
    assert metrics.model_size(model, sparse=True) == metrics.file_size(path)


def test_csr_size_follows_the_formula(tmp_path):
    model = mlp()
    pk.prune(model, 0.99, scope="local")
    dense = metrics.model_size(model)
    kept, others = kept_and_others(model)
    # each kept weight: a float32 value and its column (uint8 below 256 columns, int16 for 1024);
    # each row: an int32 pointer (rows + 1 of them)
    column_bytes = {"0.weight": 1, "2.weight": 2}
    rows = {"0.weight": 1024 + 1, "2.weight": 256 + 1}
    expected = (sum((4 + column_bytes[n]) * kept[n] + 4 * rows[n] for n in kept) + 4 * others) / dense
    path = pk.save(model, tmp_path / "s.safetensors", format="sparse")
    assert set(encodings(path)[n] for n in kept) == {"csr"}
    stored = load_file(path)
    assert stored["0.weight::col"].dtype == torch.uint8 and stored["2.weight::col"].dtype == torch.int16
    assert metrics.file_size(path) / dense == pytest.approx(expected, rel=0.10)


def test_nm_size_follows_the_formula(tmp_path):
    model = mlp()
    pk.prune(model, granularity="1:4")
    dense = metrics.model_size(model)
    kept, others = kept_and_others(model)
    expected = (sum(4 * k + math.ceil(2 * k / 8) for k in kept.values()) + 4 * others) / dense  # 2 bits each
    path = pk.save(model, tmp_path / "s.safetensors", format="sparse")
    assert metrics.file_size(path) / dense == pytest.approx(expected, rel=0.10)


def test_sparse_file_is_much_smaller_than_the_dense_file(tmp_path):
    model = mlp()
    pk.prune(model, 0.9, scope="local")
    dense = metrics.file_size(pk.save(model, tmp_path / "d.safetensors"))  # + masks stored as bools
    sparse = metrics.file_size(pk.save(model, tmp_path / "s.safetensors", format="sparse"))
    assert sparse < 0.15 * metrics.model_size(model) < 0.15 * dense


# --- errors -------------------------------------------------------------------------------------


def test_unknown_format_is_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'sprase'"):
        pk.save(nn.Linear(2, 2), tmp_path / "x.safetensors", format="sprase")
    assert not (tmp_path / "x.safetensors").exists()


def test_truncated_sparse_file_is_rejected_and_the_model_is_untouched(tmp_path):
    model = LeNet300100(in_features=64)
    pk.prune(model, 0.9, scope="local")
    path = pk.save(model, tmp_path / "s.safetensors", format="sparse")
    tensors = load_file(path)
    del tensors["fc2.weight::bitmask"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=read_metadata(path))
    fresh = LeNet300100(in_features=64)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="broken.safetensors is corrupt"):  # the checksum sees it first
        pk.load(fresh, broken)
    with pytest.raises(ValueError, match="broken.safetensors: .*lacks the tensor 'fc2.weight::bitmask'"):
        pk.load(fresh, broken, verify=False)
    assert pk.masks(fresh) == {}
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())


def test_wrong_model_is_rejected(tmp_path):
    model = LeNet300100(in_features=64)
    pk.prune(model, 0.9, scope="local")
    path = pk.save(model, tmp_path / "s.safetensors", format="sparse")
    with pytest.raises(ValueError, match="fc1.weight: the file has shape"):
        pk.load(LeNet300100(in_features=32), path)


def test_physically_pruned_and_masked_model_round_trip(tmp_path):
    structured = pytest.importorskip("prunekit.structured")
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(4, 32)
    structured.prune(model, x, ratio=0.5)  # hidden widths 64 -> 32
    pk.prune(model, 0.9, scope="local")  # and masks on top
    path = pk.save(model, tmp_path / "s.safetensors", format="sparse")
    assert metrics.model_size(model, sparse=True) == metrics.file_size(path)
    fresh = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    pk.load(fresh, path)  # the fresh, wider model is resized from the file's shape records
    assert_same_model(model, fresh)
    assert torch.equal(model(x), fresh(x))


def test_a_plain_model_holding_marks_is_stored_compressed_bit_for_bit(tmp_path):
    from torch import nn

    masked = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    pk.prune(masked, 0.9)
    plain = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    plain.load_state_dict(masked.state_dict())  # pruned entries arrive as -0.0, no masks
    with torch.no_grad():
        plain[0].weight[0, :3] = torch.tensor([0.0, -0.0, 0.0])  # both zeros among the rest
    path = pk.save(plain, tmp_path / "p.safetensors", format="sparse")
    assert encodings(path)["0.weight"] in ("bitmask", "csr")
    assert path.stat().st_size < 0.3 * metrics.model_size(plain)
    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    pk.load(fresh, path)
    for key, value in plain.state_dict().items():
        got = fresh.state_dict()[key]
        assert torch.equal(got.view(torch.int32), value.view(torch.int32)), key  # bits, signs of zero included
