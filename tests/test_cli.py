"""The ``prunekit`` command."""

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml

import prunekit
from prunekit import cli

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "name": "cli-tiny",
    "threads": 1,
    "model": {"builtin": "lenet300100"},
    "data": {"name": "digits", "batch_size": 128},
    "train": {"epochs": 1, "lr": 0.003},
    "prune": {"method": "magnitude", "sparsity": 0.5},
    "output": {"dir": "out", "report": False},
}


def write(folder, recipe, name="recipe.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def listed_sections(out: str) -> dict[str, dict[str, str]]:
    """``prunekit methods``'s output as {section: {name: description}} (wrapped cells joined)."""
    sections: dict[str, dict[str, str]] = {}
    rows = None
    name = None
    heading = False
    for line in out.splitlines():
        if line.strip() == "" or set(line.strip()) == {"─"}:
            continue
        if not line.startswith(" "):
            if not heading:  # a heading (the next unindented line, if any, is its wrapped rest)
                rows = sections.setdefault(line.split(":")[0].strip(), {})
            heading = True
            continue
        heading = False
        cells = re.match(r"^ (\S(?:.*?\S)?)\s{2,}(\S.*?)\s*$", line)
        if cells and cells.group(1) != "name":
            name = cells.group(1)
            rows[name] = cells.group(2)
        elif not cells and name is not None:  # a wrapped description
            rows[name] += " " + line.strip()
    return sections


def test_methods_lists_every_registry_with_its_description(capsys):
    from prunekit.criteria import CRITERIA
    from prunekit.granularity import GRANULARITIES
    from prunekit.llm.methods import LLM_METHODS
    from prunekit.schedules import SCHEDULES
    from prunekit.scope import SCOPES
    from prunekit.structured.criteria import GROUP_CRITERIA

    assert cli.main(["methods"]) == 0
    sections = listed_sections(capsys.readouterr().out)
    expected = {
        "Methods": dict(CRITERIA.items()),
        "Granularities": dict(GRANULARITIES.items()),
        "Scopes": {**dict(SCOPES.items()), "{pattern: sparsity}":
                   "explicit sparsity per layer name or glob (a mapping instead of a name)"},
        "Schedules": dict(SCHEDULES.items()),
        "LLM one-shot methods (prunekit.llm.prune, prunekit llm --method)": dict(LLM_METHODS.items()),
        "Structured methods": dict(GROUP_CRITERIA.items()),
    }
    assert sections == expected
    assert {"magnitude", "taylor", "obd"} <= sections["Methods"].keys() and "n:m" in sections["Granularities"]
    assert "'2:4'" in sections["Granularities"]["n:m"]


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"prunekit {prunekit.__version__}"


@pytest.mark.parametrize("command", [[], ["demo"], ["methods"], ["prune"], ["summary"]])
def test_help_on_every_subcommand(command, capsys):
    assert cli.main([*command, "--help"]) == 0
    assert "usage: prunekit" in capsys.readouterr().out


def test_usage_errors_return_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["demo", "--seed", "x"]) == 2
    assert "usage" in capsys.readouterr().err


def test_bad_recipe_is_one_line_and_status_2(tmp_path, capsys):
    bad = dict(TINY, prune={"method": "magnitude", "sparsity": 1.5})
    path = write(tmp_path, bad)
    assert cli.main(["prune", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("error: ") and "prune.sparsity" in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path, capsys):
    assert cli.main(["prune", str(tmp_path / "nope.yaml")]) == 2
    assert cli.main(["summary", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "nope.yaml" in err


def test_summary_prints_the_layers(tmp_path, capsys):
    assert cli.main(["summary", str(write(tmp_path, TINY))]) == 0
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in capsys.readouterr().out.splitlines() if "│" in line]
    # LeNet-300-100 on 64 inputs: params = in*out + out, FLOPs = 2*in*out per sample, nothing pruned yet
    assert rows == [
        ["fc1", "Linear", "300×64", "19.5K", "19.5K", "0.0%", "38.4K", "38.4K"],
        ["fc2", "Linear", "100×300", "30.1K", "30.1K", "0.0%", "60.0K", "60.0K"],
        ["fc3", "Linear", "10×100", "1.0K", "1.0K", "0.0%", "2.0K", "2.0K"],
        ["total", "", "", "50.6K", "50.6K", "0.0%", "100.4K", "100.4K"],
    ]
    assert not (tmp_path / "out").exists()


def test_prune_runs_a_recipe(tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert cli.main(["prune", str(write(tmp_path, TINY)), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    rows = {r[0]: r[1:] for r in (re.split(r"\s{2,}", line.strip()) for line in captured.out.splitlines())}
    before, after = results["before"], results["after"]
    assert rows["accuracy"] == [f"{100 * before['accuracy']:.1f}%", f"{100 * after['accuracy']:.1f}%"]
    assert rows["sparsity"] == ["-", "50.0%"]
    assert rows["compression"] == ["1.0×", f"{after['compression_ratio']:.1f}×"] == ["1.0×", "2.0×"]
    assert "training for 1 epoch\n" in captured.err  # not "1 epochs"
    assert (out / "model.safetensors").is_file() and (out / "results.json").is_file()
    assert not (tmp_path / "out").exists()  # --out wins over output.dir


def test_demo_arguments_reach_the_demo(monkeypatch, tmp_path):
    calls = {}

    def fake_demo(out_dir, quick, seed, progress, console, threads):
        calls.update(out_dir=out_dir, quick=quick, seed=seed, progress=progress, threads=threads)
        return {"files": {"results": str(tmp_path / "results.json")}, "wall_time_s": 0.1}

    monkeypatch.setattr("prunekit.demo.demo", fake_demo)
    assert cli.main(["demo", "--out", str(tmp_path), "--quick", "--seed", "3", "--no-progress"]) == 0
    assert calls == {"out_dir": str(tmp_path), "quick": True, "seed": 3, "progress": False, "threads": 1}
    cli.main(["demo"])
    assert calls["out_dir"] == "prunekit-demo" and calls["quick"] is False and calls["seed"] == 0


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("prunekit") == "prunekit_cli:main"  # light: catches Ctrl-C while torch imports


@pytest.mark.slow
def test_as_a_process_no_traceback(tmp_path):
    path = write(tmp_path, dict(TINY, prune={"method": "magnitud", "sparsity": 0.5}))
    done = subprocess.run([sys.executable, "-m", "prunekit.cli", "prune", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("error: prune.method: unknown method 'magnitud'; did you mean 'magnitude'?")


def test_summary_of_a_model_that_does_not_fit_its_data(tmp_path, capsys):
    path = write(tmp_path, dict(TINY, model={"builtin": "lenet5"}))  # a conv net fed flat digits
    assert cli.main(["summary", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model and data do not fit") and err.count("\n") == 1


def test_demo_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.slow  # builds a recipe's model and data, or runs subprocesses
def test_unwritable_output_folder_fails_before_the_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"  # its parent is a file: nothing can be written there
    assert cli.main(["prune", str(write(tmp_path, TINY)), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "cannot write to the output folder" in captured.err and str(tmp_path / "file") in captured.err
    assert "training" not in captured.err and "before pruning" not in captured.err  # refused before the work


@pytest.mark.slow  # builds a recipe's model and data, or runs subprocesses
def test_report_with_truncated_weights_is_one_line_naming_the_file(tmp_path, capsys):
    from prunekit.models import LeNet300100

    weights = tmp_path / "model.safetensors"
    prunekit.save(LeNet300100(), weights)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    argv = ["report", "--recipe", str(write(tmp_path, TINY)), "--weights", str(weights), "--no-speed",
            "--out", str(tmp_path / "report")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --weights: ") and err.count("\n") == 1 and str(weights) in err
    assert not (tmp_path / "report").exists()


REPORT_UNDER_FSIZE = """
import resource, signal, sys
from prunekit import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow  # builds a recipe's model and data, or runs subprocesses
def test_a_full_disk_while_writing_keeps_the_previous_report(tmp_path):
    results = ROOT / "benchmarks" / "results" / "demo.json"
    out = tmp_path / "report"
    assert cli.main(["report", str(results), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    done = subprocess.run([sys.executable, "-c", REPORT_UNDER_FSIZE, "report", str(results), "--title", "new",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous report, intact
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder or lock left behind
