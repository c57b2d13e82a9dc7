"""The compact N:M format: exact round trips, the bytes it takes, whole models."""

import pytest
import torch

import prunekit as pk
from prunekit.llm import nm_format as F
from prunekit.llm.methods import parse_pattern


def _nm_weight(rows, cols, pattern, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    return w * parse_pattern(pattern).keep_best(w.float().abs())


@pytest.mark.parametrize("pattern,bits", [("2:4", 2), ("4:8", 3), ("1:4", 2), ("1:2", 1), ("8:16", 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_is_exact_and_small(pattern, bits, dtype):
    n, m = map(int, pattern.split(":"))
    w = _nm_weight(24, 64, pattern, dtype)
    w[0, :m] = 0  # a group with fewer than N non-zeros
    w[1, m : m + 1] = -0.0
    packed = F.pack(w, pattern)
    assert F.index_bits(m) == bits
    assert packed.values.shape == (24, 64 * n // m) and packed.values.dtype == dtype
    assert packed.indices.dtype == torch.uint8
    assert packed.indices.numel() == -(-24 * 64 * n // m * bits // 8)
    out = F.unpack(packed)
    assert out.dtype == dtype and torch.equal(out, w)
    assert packed.nbytes == 24 * 64 * n // m * w.element_size() + packed.indices.numel()


def test_float32_2_4_takes_2_125_bytes_per_entry():
    w = _nm_weight(128, 256, "2:4")
    packed = F.pack(w, "2:4")
    assert packed.nbytes / w.numel() == pytest.approx(2.125)
    assert w.numel() * 4 / packed.nbytes == pytest.approx(4 / 2.125)


def test_pack_refuses_weights_that_break_the_pattern():
    w = _nm_weight(4, 16, "2:4")
    w[2, 5] = 1.0
    w[2, 6] = 1.0
    w[2, 4] = 1.0
    with pytest.raises(ValueError, match="does not follow the 2:4 pattern"):
        F.pack(w, "2:4")
    with pytest.raises(ValueError, match="not divisible by M=8"):
        F.pack(torch.zeros(4, 12), "4:8")


def test_save_and_load_a_pruned_model_exactly(tmp_path):
    pytest.importorskip("transformers")
    from prunekit.llm.models import tiny_model

    for arch in ("gpt2", "llama"):  # Conv1D (in, out) and Linear (out, in)
        model = tiny_model(arch)
        pk.llm.prune(model, pk.llm.random_calibration(256, 4, 16), method="sparsegpt", pattern="2:4")
        report = F.save_nm(model, tmp_path / f"{arch}.nm.safetensors", "2:4")
        assert len(report.packed) == len(pk.masks(model))  # every pruned layer is packed
        assert report.packed_ratio == pytest.approx(4 / 2.125)
        assert report.file_bytes < report.dense_bytes
        state = F.load_nm(report.path)
        expected = dict(pk.masking.named_effective_tensors(model))
        for name, value in expected.items():
            assert torch.equal(state[name], value.detach()), name
        fresh = tiny_model(arch, seed=9)
        fresh.load_state_dict(state, strict=False)
        ids = pk.llm.random_calibration(256, 2, 8)
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a prunekit N:M file"):
        F.load_nm(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        F.load_nm(tmp_path / "missing.safetensors")


def test_the_nm_file_and_the_sparse_format_store_the_same_positions():
    from prunekit import sparse_format

    w = _nm_weight(8, 16, "2:4")
    tensors, _ = sparse_format.encode({"w": w, "__mask__.w": w != 0})
    assert torch.equal(F.pack(w, "2:4").indices, tensors["w::indices"])
    assert torch.equal(F.pack(w, "2:4").values.reshape(-1), tensors["w::values"])


def test_load_refuses_an_older_version(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "v1.safetensors"), metadata={"format": F.FORMAT, "version": "1"})
    with pytest.raises(ValueError, match="version 1"):
        F.load_nm(tmp_path / "v1.safetensors")
