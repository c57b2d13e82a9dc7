"""The demo experiment: ``--quick`` runs end to end and its numbers make sense."""

import dataclasses
import io
import json
import signal
import struct
from pathlib import Path

import pytest
import torch
from rich.console import Console

from prunekit import render
from prunekit.demo import DemoConfig, best_row, demo, readme_table, run_demo, sparsest_within, write_outputs

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent
#: the full demo's own results (benchmarks/demo_readme.py --run writes them), behind the README's table
DEMO_RESULTS = ROOT / "benchmarks" / "results" / "demo.json"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick demo run shared by the tests of this module: (results, output folder, printed text)."""
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    results = demo(out, quick=True, seed=0, progress=False, console=Console(file=printed, width=120))
    return results, out, printed.getvalue()


def rows_of(results, method, scope, sparsity, finetuned):
    found = [
        r for r in results["rows"]
        if (r["method"], r["scope"], r["sparsity"], r["finetuned"]) == (method, scope, sparsity, finetuned)
    ]
    assert len(found) == 1
    return found[0]


def test_results_json_has_every_run(quick):
    _, out, _ = quick
    saved = json.loads((out / "results.json").read_text())
    config = DemoConfig.quick()
    assert len(saved["rows"]) == len(config.methods) * len(config.sparsities) * 2
    for method, scope in config.methods:
        for sparsity in config.sparsities:
            for finetuned in (False, True):
                row = rows_of(saved, method, scope, sparsity, finetuned)
                assert 0.0 <= row["accuracy"] <= 1.0
                assert row["achieved_sparsity"] == pytest.approx(sparsity, abs=1e-3)
                assert set(row["per_layer"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert saved["dense"]["accuracy"] > 0.9  # LeNet-300-100 learns digits
    assert saved["dense"]["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert saved["settings"]["sparsities"] == list(config.sparsities)
    assert saved["settings"]["seed"] == 0
    assert saved["kind"] == "prunekit.demo"  # how `prunekit report` recognises it


def test_magnitude_beats_random_at_90_percent(quick):
    results, _, _ = quick
    magnitude = rows_of(results, "magnitude", "global", 0.9, False)["accuracy"]
    random = rows_of(results, "random", "global", 0.9, False)["accuracy"]
    assert magnitude > random + 0.3
    assert random < 0.3  # 90% random pruning without fine-tuning is close to chance


def test_fine_tuning_recovers_accuracy(quick):
    results, _, _ = quick
    before = rows_of(results, "magnitude", "global", 0.9, False)["accuracy"]
    after = rows_of(results, "magnitude", "global", 0.9, True)["accuracy"]
    assert after > before


def test_metrics_follow_the_sparsity(quick):
    results, _, _ = quick
    for row in results["rows"]:
        # every parameter counts (biases stay), so compression is a bit below 1 / (1 - sparsity)
        assert 1.0 < row["compression_ratio"] <= 1.0 / (1.0 - row["sparsity"]) + 1e-6
        assert row["theoretical_speedup"] == pytest.approx(1.0 / (1.0 - row["sparsity"]), rel=0.05)
        assert row["latency_s"] > 0


def test_pngs_are_valid(quick):
    import matplotlib.image

    _, out, _ = quick
    for name in ("accuracy_vs_sparsity.png", "layer_sparsity.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 150
        assert matplotlib.image.imread(out / name).shape[:2] == (height, width)


def test_report_embeds_images_and_table(quick):
    results, out, _ = quick
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 2
    assert "<table>" in html and html.count("<tr") == len(results["rows"]) + 1
    for word in ("magnitude", "random", "taylor", "fine-tuned", "Settings"):
        assert word in html
    assert f"{results['dense']['accuracy']:.1%}" in html


def test_table_is_printed(quick):
    results, _, printed = quick
    for word in ("method", "accuracy", "compression", "speedup", "latency", "dense", "taylor"):
        assert word in printed
    best = best_row(results["rows"])
    assert f"{best['accuracy']:.1%}" in printed


def test_best_and_sparsest_rows():
    rows = [
        {"sparsity": 0.5, "accuracy": 0.96}, {"sparsity": 0.9, "accuracy": 0.80},
        {"sparsity": 0.9, "accuracy": 0.95}, {"sparsity": 0.95, "accuracy": 0.5},
    ]
    assert best_row(rows) is rows[2]
    assert sparsest_within(rows, dense_accuracy=0.96) is rows[2]
    assert sparsest_within(rows, dense_accuracy=0.99) is None


def test_same_seed_same_results():
    config = DemoConfig(sparsities=(0.9,), methods=(("magnitude", "global"), ("random", "global")),
                        train_epochs=2, finetune_epochs=1, latency_repeats=1)
    a, b = run_demo(config, progress=False), run_demo(config, progress=False)
    assert [r["accuracy"] for r in a["rows"]] == [r["accuracy"] for r in b["rows"]]
    assert a["dense"]["accuracy"] == b["dense"]["accuracy"]


def test_default_grid_matches_the_documented_experiment():
    config = DemoConfig()
    assert config.sparsities == (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    assert config.methods == (("magnitude", "global"), ("magnitude", "local"), ("random", "global"), ("taylor", "global"))
    assert 2 <= config.finetune_epochs <= 3


def test_bad_threads_is_a_user_error(tmp_path):
    with pytest.raises(ValueError, match="threads"):
        demo(tmp_path / "x", quick=True, threads=0)
    assert not (tmp_path / "x").exists()


# --- the README's table, and outputs that survive an interruption --------------------------------------


def test_readme_table_is_generated_from_the_demos_own_results():
    results = json.loads(DEMO_RESULTS.read_text(encoding="utf-8"))
    config = dataclasses.asdict(DemoConfig())  # the full demo, as `prunekit demo` runs it
    assert {k: results["settings"][k] for k in config} == json.loads(json.dumps(config))
    table = readme_table(results)
    assert table in (ROOT / "README.md").read_text(encoding="utf-8")
    dense = results["dense"]["accuracy"]
    assert f"dense accuracy {100 * dense:.1f}%" in table
    row = rows_of(results, "taylor", "global", 0.9, False), rows_of(results, "taylor", "global", 0.9, True)
    assert f"| {100 * row[0]['accuracy']:.1f} → {100 * row[1]['accuracy']:.1f} |" in table.split("| 90% |")[1]


def test_readme_table_grammar():
    results = json.loads(DEMO_RESULTS.read_text(encoding="utf-8"))
    one = dict(results, settings=dict(results["settings"], finetune_epochs=1))
    assert "with 1 epoch of fine-tuning" in readme_table(one)
    assert "with 3 epochs of fine-tuning" in readme_table(dict(one, settings=dict(one["settings"], finetune_epochs=3)))


@pytest.mark.slow  # draws the full demo's plots twice
def test_ctrl_c_while_writing_keeps_the_previous_output(tmp_path, monkeypatch):
    results = json.loads(DEMO_RESULTS.read_text(encoding="utf-8"))
    out = tmp_path / "demo"
    write_outputs(results, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = render.write_html

    def interrupted(path, *args, **kwargs):  # half the page is written when Ctrl-C arrives
        Path(path).write_text("<!DOCTYPE html><html><body>half", encoding="utf-8")
        signal.raise_signal(signal.SIGINT)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(render, "write_html", interrupted)
    changed = dict(results, dense=dict(results["dense"], accuracy=0.5))
    with pytest.raises(KeyboardInterrupt):
        write_outputs(changed, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous run's files, all intact
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left behind
