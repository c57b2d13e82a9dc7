"""YAML recipes: validation before anything runs, and an end-to-end run."""

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import prunekit as pk
from prunekit.fileio import FolderInUse
from prunekit.models import LeNet300100
from prunekit.recipe_run import run_recipe
from prunekit.recipes import RecipeError, build_model, load_recipe, parse_recipe, prepare

torch.set_num_threads(1)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

BASE = {
    "name": "tiny",
    "seed": 0,
    "threads": 1,
    "model": {"builtin": "lenet300100", "kwargs": {"num_classes": 10}},
    "data": {"name": "digits", "batch_size": 128},
    "train": {"epochs": 2, "lr": 0.003},
    "prune": {"method": "magnitude", "sparsity": 0.8, "scope": "global"},
    "finetune": {"epochs": 1},
    "output": {"dir": "out"},
}


def write(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def changed(**sections) -> dict:
    """BASE with some keys replaced: ``changed(prune={"sparsity": 1.5})`` merges into the section."""
    recipe = copy.deepcopy(BASE)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    return recipe


# --- end to end ---------------------------------------------------------------------------------------


def test_valid_recipe_runs_and_the_saved_model_loads(tmp_path):
    path = write(tmp_path, BASE)
    results = run_recipe(path)
    out = tmp_path / "out"  # relative to the recipe's folder
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "results.json", "report.html", "layer_sparsity.png"}

    saved = json.loads((out / "results.json").read_text())
    assert saved["after"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert saved["before"]["accuracy"] > 0.8  # two epochs are enough for digits
    # pruning 80% of a briefly trained net costs accuracy (0.89 -> 0.73 here); one epoch of fine-tuning wins it back
    assert 0.5 < saved["pruned_accuracy"] < saved["before"]["accuracy"] - 0.05
    assert saved["after"]["accuracy"] > saved["pruned_accuracy"] + 0.05
    assert saved["after"]["compression_ratio"] > 4.0
    assert saved["settings"]["prune"]["method"] == "magnitude"
    assert saved["kind"] == "prunekit.recipe"
    assert len(saved["history"]) == 1

    fresh = LeNet300100(num_classes=10)
    pk.load(fresh, out / "model.safetensors")
    assert pk.sparsity(fresh) == pytest.approx(saved["after"]["sparsity"])
    assert pk.sparsity(fresh, per_layer=True) == pytest.approx(saved["per_layer"])
    from prunekit.data import digits, evaluate, loaders

    _, test_loader = loaders(*digits(), batch_size=128)
    assert evaluate(fresh, test_loader) == pytest.approx(results["after"]["accuracy"])

    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 1  # the per-layer bars
    assert "Before and after" in html and "tiny" in html and "Fine-tuning" in html
    # the file-size row of the file this run wrote is that file's size on disk
    written = (out / "model.safetensors").stat().st_size
    assert saved["after"]["model_file_bytes"] == written
    assert re.search(r'<td class="\w+">model.safetensors as written</td><td class="right">-</td>'
                     rf'<td class="right">{written / 1024:,.1f} KiB</td>', html)


def test_factory_schedule_and_data_driven_method(tmp_path):
    shutil.copy(EXAMPLES / "my_model.py", tmp_path / "my_model.py")
    recipe = changed(
        model={"builtin": None, "factory": "my_model.py:build", "kwargs": {"hidden": 32}},
        prune={"method": "taylor", "sparsity": 0.75, "scope": "local", "exclude": ["6"], "calibration_batches": 2},
        schedule={"name": "iterative", "steps": 2, "every": 1},
        finetune={"epochs": 2},
        output={"dir": "run", "save": False, "report": False},
    )
    del recipe["model"]["builtin"]
    results = run_recipe(write(tmp_path, recipe))
    sparsities = [h["sparsity"] for h in results["history"]]
    assert sparsities[0] < sparsities[1]
    assert results["per_layer"]["1.weight"] == pytest.approx(0.75, abs=1e-3)
    assert "6.weight" not in results["per_layer"]  # excluded
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"results.json"}


def test_module_factory_is_found_next_to_the_recipe(tmp_path, monkeypatch):
    shutil.copy(EXAMPLES / "my_model.py", tmp_path / "my_model.py")
    recipe = changed(model={"builtin": None, "factory": "my_model:build", "kwargs": {"hidden": 16}})
    del recipe["model"]["builtin"]
    path = write(tmp_path, recipe)
    monkeypatch.chdir(tmp_path.parent)
    model = build_model(load_recipe(path))
    assert model[1].out_features == 16


def test_weights_are_loaded_relative_to_the_recipe(tmp_path, monkeypatch):
    torch.manual_seed(123)
    trained = LeNet300100()
    pk.prune(trained, 0.5)
    (tmp_path / "weights").mkdir()
    pk.save(trained, tmp_path / "weights" / "w.safetensors")
    recipe = changed(model={"weights": "weights/w.safetensors"})
    del recipe["train"]
    path = write(tmp_path, recipe)
    monkeypatch.chdir(tmp_path.parent)  # not the recipe's folder
    model = build_model(load_recipe(path))
    assert torch.equal(model.fc1.weight, trained.fc1.weight)
    assert pk.sparsity(model) == pytest.approx(0.5)


def test_output_dir_resolves_against_the_recipe_folder(tmp_path, monkeypatch):
    path = write(tmp_path, BASE)
    monkeypatch.chdir(tmp_path.parent)
    assert load_recipe(path).output_dir == tmp_path.resolve() / "out"
    no_output = changed()
    del no_output["output"]
    assert parse_recipe(no_output, base_dir=tmp_path).output_dir == tmp_path / "tiny-out"


@pytest.mark.parametrize("example", ["lenet_digits.yaml", "my_model.yaml"])
def test_examples_are_valid(example):
    raw = yaml.safe_load((EXAMPLES / example).read_text(encoding="utf-8"))
    before = sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*") if "__pycache__" not in p.parts)
    prepared = prepare(EXAMPLES / example)  # builds model and data, dry-runs pruning; writes nothing
    assert prepared.recipe.prune.sparsity == raw["prune"]["sparsity"]
    assert prepared.recipe.prune.method == raw["prune"]["method"]
    assert prepared.out_dir == (EXAMPLES / raw["output"]["dir"]).resolve()  # relative to the recipe's folder
    assert sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*") if "__pycache__" not in p.parts) == before
    x, _ = prepared.test_set[:8]
    assert prepared.model(x).shape == (8, 10)  # the model fits the data's inputs and classes


# --- validation ------------------------------------------------------------------------------------------

BAD = {
    "unknown key": (changed(prune={"sparsty": 0.9}), ["prune.sparsty", "did you mean 'sparsity'"]),
    "unknown section": (changed(finetuning={"epochs": 1}), ["finetuning", "did you mean 'finetune'"]),
    "wrong type": (changed(data={"batch_size": "64"}), ["data.batch_size", "integer"]),
    "wrong section type": (changed(prune=[0.9]), ["prune", "mapping"]),
    "sparsity 1.5": (changed(prune={"sparsity": 1.5}), ["prune.sparsity", "[0, 1)"]),
    "negative sparsity": (changed(prune={"sparsity": -0.1}), ["prune.sparsity"]),
    "missing sparsity": (changed(prune={"method": "magnitude", "sparsity": None}), ["prune.sparsity", "required"]),
    "unknown method": (changed(prune={"method": "magnitud"}), ["prune.method", "did you mean 'magnitude'"]),
    "unknown scope": (changed(prune={"scope": "globl"}), ["prune.scope", "global"]),
    "unknown granularity": (changed(prune={"granularity": "elements"}), ["prune.granularity", "element"]),
    "unquoted n:m": (changed(prune={"granularity": 124}), ["prune.granularity", "quote"]),
    "exclude matches nothing": (changed(prune={"exclude": ["fc9"]}), ["prune", "fc9"]),
    "missing weights": (changed(model={"weights": "nope.safetensors"}), ["model.weights", "nope.safetensors"]),
    "missing factory module": (changed(model={"builtin": None, "factory": "no_such_module_xyz:build"}),
                               ["model.factory", "no_such_module_xyz"]),
    "missing factory file": (changed(model={"builtin": None, "factory": "nope.py:build"}), ["model.factory", "nope.py"]),
    "both builtin and factory": (changed(model={"factory": "x:y"}), ["model", "exactly one"]),
    "unknown builtin": (changed(model={"builtin": "lenet3000"}), ["model.builtin", "lenet300100"]),
    "bad model kwargs": (changed(model={"kwargs": {"num_clases": 3}}), ["model.kwargs.num_clases", "num_classes"]),
    "unknown data": (changed(data={"name": "mnist"}), ["data.name", "digits"]),
    "bad data kwargs": (changed(data={"kwargs": {"imag": True}}), ["data.kwargs.imag", "image"]),
    "model does not fit data": (changed(model={"builtin": "lenet5"}), ["model and data do not fit", "(1, 64)"]),
    "bad optimizer": (changed(finetune={"optimizer": "adamw"}), ["finetune.optimizer", "adam"]),
    "unknown schedule": (changed(schedule={"name": "cubic"}), ["schedule.name", "cubic"]),
    "schedule key of another schedule": (changed(schedule={"name": "agp", "end": 1, "steps": 3}), ["schedule.steps", "agp"]),
    "schedule longer than fine-tuning": (changed(schedule={"name": "iterative", "steps": 3}), ["finetune.epochs", "3"]),
    "negative epochs": (changed(train={"epochs": -1}), ["train.epochs"]),
    "num_classes below the data's": (changed(model={"kwargs": {"num_classes": 3}}),
                                     ["model and data do not fit", "10 classes", "num_classes to 10"]),
    "negative num_classes": (changed(model={"kwargs": {"num_classes": -1}}), ["model.kwargs", "building the model failed"]),
    "seed beyond 64 bits": (changed(seed=2**70), ["seed", "2**63 - 1"]),
    "more threads than CPUs": (changed(threads=100000), ["threads", "100000", "CPU"]),
    "name that leaves the folder": (changed(name="../../x"), ["name", "plain name"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_raises_and_writes_nothing(case, tmp_path):
    recipe, expected = BAD[case]
    recipe = copy.deepcopy(recipe)
    if recipe["model"].get("builtin") is None:
        recipe["model"].pop("builtin", None)
    path = write(tmp_path, recipe)
    with pytest.raises(RecipeError) as error:
        run_recipe(path)
    message = str(error.value)
    for text in expected:
        assert text in message, message
    assert "\n" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]  # no output folder, nothing written


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("model: [1\n")
    with pytest.raises(RecipeError, match="broken.yaml"):
        load_recipe(tmp_path / "broken.yaml")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(tmp_path / "empty.yaml")


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(RecipeError, match="output.dir"):
        run_recipe(write(tmp_path, BASE))


def test_recipe_error_is_a_value_error():
    assert issubclass(RecipeError, ValueError)


def test_defaults_are_filled_in():
    recipe = parse_recipe({"model": {"builtin": "lenet300100"}, "data": {"name": "digits"}, "prune": {"sparsity": 0.5}})
    assert recipe.prune.method == "magnitude" and recipe.prune.scope == "global"
    assert recipe.prune.exclude == [] and recipe.schedule is None and recipe.finetune is None
    assert recipe.output.save and recipe.output.report
    assert recipe.to_dict()["prune"]["granularity"] == "element"


def test_n_m_pattern_needs_no_sparsity():
    recipe = parse_recipe({"model": {"builtin": "lenet300100"}, "data": {"name": "digits"},
                           "prune": {"granularity": "2:4"}})
    assert recipe.prune.sparsity is None
    with pytest.raises(RecipeError, match="prune.sparsity"):
        parse_recipe({"model": {"builtin": "lenet300100"}, "data": {"name": "digits"},
                      "prune": {"granularity": "2:4", "sparsity": 0.9}})


# --- outputs: one run's complete files, never a mix ----------------------------------------------------


QUICK = changed(train={"epochs": 1}, finetune={"epochs": 0})


@pytest.mark.slow  # two recipe runs
def test_a_second_run_replaces_the_folder_as_a_whole(tmp_path):
    path = write(tmp_path, QUICK)
    run_recipe(path)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    run_recipe(write(tmp_path, dict(QUICK, output={"dir": "out", "save": False})))
    # the first run's model is gone with its folder: the folder holds the second run's files only
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "report.html", "layer_sparsity.png"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary sibling left


@pytest.mark.slow  # a second process imports prunekit
def test_a_folder_in_use_by_another_run_is_refused_before_running(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(  # another process holds the output folder, as a running `prunekit prune` does
        [sys.executable, "-c", "import sys, time\nfrom prunekit.fileio import folder_lock\n"
         "with folder_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUse, match="in use by another prunekit run"):
            run_recipe(write(tmp_path, QUICK))
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_an_output_folder_with_other_files_is_not_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a prunekit output"):
        run_recipe(write(tmp_path, QUICK))
    assert (tmp_path / "out" / "thesis.tex").read_text() == "years of work"


def test_an_output_folder_holding_the_recipe_is_not_replaced(tmp_path):
    (tmp_path / "results.json").write_text("{}")  # it even looks like an earlier output
    path = write(tmp_path, dict(QUICK, output={"dir": "."}))
    with pytest.raises(ValueError, match="holds .*recipe.yaml"):
        run_recipe(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "results.json"]
