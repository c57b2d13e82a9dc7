"""``prunekit report``: one HTML page from results files and a model, each part built by its producer.

It sits above the producers: a results file names its producer in its ``kind`` field
(``"prunekit.demo"``, ``"prunekit.recipe"``, ``"prunekit.sensitivity"``, ``"prunekit.sparse_inference"``,
``"prunekit.speed_size"``), the producer turns it into :class:`~prunekit.render.Parts` (its cards,
sections, settings, accuracy points, per-layer sparsity), and :func:`~prunekit.render.write_page`
lays the merged parts out as one page. What a model adds is measured here: :func:`measure_speed_size`,
:func:`accuracy_sweep`, and a sensitivity analysis (:func:`prunekit.sensitivity`).

* :func:`write_report` (``pk.report.write_report``): a report from loaded results and Python objects.
* :func:`build_report`: what ``prunekit report`` runs (files, a recipe's model, measurements).

The rendering helpers (:class:`~prunekit.render.Column`, :func:`~prunekit.render.print_table`,
:func:`~prunekit.render.write_html`, the plots of :mod:`prunekit.plots`, ...) are importable from here
too, as they always were.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import demo, export, masking, metrics, recipe_run, recipes, sensitivity_analysis
from .plots import plot_accuracy_vs_sparsity, plot_layer_sparsity, require_matplotlib
from .data import evaluate
from .outputs import RunOutput
from .pruning import prune
from .render import (  # noqa: F401  (re-exported: the report's building blocks, as before)
    SPEED_SIZE_COLUMNS,
    Card,
    Column,
    Parts,
    Section,
    headline_html,
    image_html,
    json_safe,
    percent,
    print_table,
    seconds,
    settings_html,
    speed_size_cards,
    speed_size_rows,
    table_html,
    times,
    write_html,
    write_json,
    write_page,
)
from .scope import check_sparsity
from .sensitivity_analysis import plot_sensitivity

__all__ = [
    "Column",
    "Section",
    "Card",
    "percent",
    "times",
    "seconds",
    "print_table",
    "require_matplotlib",
    "plot_accuracy_vs_sparsity",
    "plot_layer_sparsity",
    "headline_html",
    "image_html",
    "table_html",
    "settings_html",
    "write_html",
    "plot_sensitivity",
    "measure_speed_size",
    "speed_size_rows",
    "accuracy_sweep",
    "load_results",
    "result_kind",
    "write_report",
    "build_report",
    "write_json",
    "SPEED_SIZE_KIND",
]

#: the ``kind`` of a saved :func:`measure_speed_size` dict
SPEED_SIZE_KIND = "prunekit.speed_size"
#: the ``kind`` of ``benchmarks/sparse_inference.py``'s JSON
SPARSE_INFERENCE_KIND = "prunekit.sparse_inference"

#: ``kind`` field -> the short name :func:`result_kind` returns
KINDS = {
    demo.KIND: "demo",
    recipe_run.KIND: "recipe",
    sensitivity_analysis.KIND: "sensitivity",
    SPARSE_INFERENCE_KIND: "sparse_inference",
    SPEED_SIZE_KIND: "speed_size",
}

#: files written before results carried a ``kind`` are recognised by the keys only they have
_LEGACY_KEYS = [
    ("demo", ("rows", "dense")),
    ("recipe", ("before", "after")),
    ("sparse_inference", ("linear", "settings")),
    ("speed_size", ("size_sparse_bytes", "latency_dense_s")),
]


def result_kind(data: Mapping[str, Any]) -> str:
    """What a results JSON holds: ``"demo"``, ``"recipe"``, ``"sensitivity"``, ``"sparse_inference"``,
    ``"speed_size"``, read from its ``kind`` field; ``ValueError`` for anything else.

    Files without a ``kind`` (written by prunekit 0.1.0 before it had one) are recognised by the keys
    only their producer writes.
    """
    if not isinstance(data, Mapping):
        raise ValueError("a results file must hold a JSON object")
    kind = data.get("kind")
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown results kind {kind!r} (known: {', '.join(KINDS)})")
        return KINDS[kind]
    for name, keys in _LEGACY_KEYS:
        if all(key in data for key in keys):
            return name
    raise ValueError("not a prunekit results file (expected the JSON of `prunekit demo`, a recipe's results.json, "
                     "a sensitivity analysis or benchmarks/sparse_inference.py)")


def load_results(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(kind, data)`` of a results JSON file (see :func:`result_kind`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path.name} is not valid JSON ({error})") from None
    try:
        return result_kind(data), data
    except ValueError as error:
        raise ValueError(f"{path.name}: {error}") from None


# --- what a model gives ---------------------------------------------------------------------------


def accuracy_sweep(
    model: torch.nn.Module,
    evaluate: Callable[[torch.nn.Module], float],
    sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
    scopes: Sequence[str] = ("global", "local"),
    method: str = "magnitude",
    sensitivity: Any = None,
) -> list[dict[str, Any]]:
    """Rows for :func:`~prunekit.plots.plot_accuracy_vs_sparsity`: ``evaluate`` of a copy of ``model``
    pruned at each sparsity with each scope (no fine-tuning), plus the sensitivity allocation when a
    result is given. Rows carry ``per_layer`` sparsities too.

    A model that is already pruned is not taken for a dense one: the sweep starts from it, its series
    say so (``"magnitude (global), from 80% sparse"``), grid points at or below its sparsity are left
    out (pruning less than it has changes nothing), and each row's ``sparsity`` is the one reached."""
    rows = []
    start = masking.sparsity(model) if masking.masks(model) else 0.0
    suffix = f", from {start:.0%} sparse" if start else ""
    labelled: list[tuple[str, Any]] = [(scope, scope) for scope in scopes]
    if sensitivity is not None:
        labelled.append(("sensitivity", sensitivity_analysis.as_result(sensitivity)))
    for sparsity in [s for s in sparsities if s > start + 1e-9]:
        for name, scope in labelled:
            pruned = copy.deepcopy(model)
            if name == "sensitivity":
                prune(pruned, scope=scope.allocate(sparsity=sparsity))
            else:
                prune(pruned, sparsity, method=method, scope=scope)
            reached = masking.sparsity(pruned) if start else sparsity
            rows.append({"label": f"{method} ({name}){suffix}", "method": method, "scope": name, "sparsity": reached,
                         "target": sparsity, "finetuned": False, "accuracy": float(evaluate(pruned)),
                         "per_layer": masking.sparsity(pruned, per_layer=True)})
    return rows


def measure_speed_size(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    sparse_kernels: bool = True,
    repeats: int = 20,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Size and speed of a (pruned) model against its dense self, measured on this machine.

    Returns ``params_total``, ``params_nonzero``, ``size_dense_bytes`` (safetensors, zeros stored),
    ``size_sparse_bytes`` (``format="sparse"``), ``flops_dense``, ``flops_remaining`` (for
    ``example_inputs``), ``latency_dense_s`` (the finalized model) and ``latency_sparse_s`` (what
    :func:`prunekit.export.sparsify` makes of it; the dense latency when no layer pays) with
    ``converted_layers`` and the sparsify ``plan``. ``sparse_kernels=False`` skips sparsify.
    """
    total, nonzero = metrics.count_params(model)
    flops_dense, flops_remaining = metrics.flops(model, example_inputs)
    out: dict[str, Any] = {
        "kind": SPEED_SIZE_KIND,
        "params_total": total,
        "params_nonzero": nonzero,
        "size_dense_bytes": metrics.model_size(model),
        "size_sparse_bytes": metrics.model_size(model, sparse=True),
        "flops_dense": flops_dense,
        "flops_remaining": flops_remaining,
        "threads": threads,
        "converted_layers": [],
        "plan": None,
    }
    plan = None
    if sparse_kernels:
        plan = export.plan_sparsity(model, example_inputs, threads=threads)
        with warnings.catch_warnings():  # "measured slower as a whole": the plan records it (reverted)
            warnings.simplefilter("ignore", UserWarning)
            export.sparsify(model, example_inputs, plan=plan)
        out["plan"] = plan.to_dict()
    if plan is not None and plan.converted and not plan.reverted:
        out["converted_layers"] = plan.converted
        out["latency_dense_s"], out["latency_sparse_s"] = plan.model_dense_s, plan.model_sparse_s
    else:
        dense = metrics.latency(metrics.deployed(model), example_inputs, repeats=repeats, threads=threads)
        out["latency_dense_s"] = out["latency_sparse_s"] = dense
    return out


# --- the parts no producer module owns -------------------------------------------------------------


BENCHMARK_COLUMNS = [
    Column("sparsity", format=lambda v: percent(v, 0)),
    Column("batch"),
    Column("dense_s", "dense", format=seconds),
    Column("sparse_s", "sparse (CSR)", format=seconds),
    Column("speedup", format=lambda v: times(v, 2)),
    Column("ideal", "ideal 1/(1-s)", format=lambda v: times(v, 0)),
    Column("sparsify", "sparsify picks"),
]


def _sparse_inference_parts(data: Mapping[str, Any]) -> Parts:
    """The table of ``benchmarks/sparse_inference.py``."""
    setup = data["settings"]
    return Parts(sections=[Section(
        f"Sparse kernels: {setup.get('layer')}, {setup.get('threads')} thread(s)",
        table_html(data["linear"], BENCHMARK_COLUMNS),
        note="Median time per call, dense vs torch.sparse CSR, measured interleaved; ideal = 1 / (1 - "
             "sparsity). sparsify converts a layer only when it measures at least 1.1x faster.")])


def _speed_size_parts(measured: Mapping[str, Any]) -> Parts:
    """The speed and size table of a :func:`measure_speed_size` dict, with its two headline numbers."""
    converted = measured.get("converted_layers") or []
    note = ("Dense: the finalized model, zeros stored. Pruned: non-zero parameters, the compressed file "
            "(format='sparse'), FLOPs left, and the latency of prunekit.export.sparsify's model"
            + (f" ({len(converted)} layers on sparse kernels)." if converted else " (no layer was faster on "
               "sparse kernels, so it stays dense)."))
    return Parts(cards=speed_size_cards(measured),
                 sections=[Section("Speed and size", table_html(speed_size_rows(measured), SPEED_SIZE_COLUMNS),
                                   note=note)])


def write_report(
    out_dir: str | os.PathLike,
    *,
    results: Sequence[Mapping[str, Any]] = (),
    sensitivity: Any = None,
    speed_size: Mapping[str, Any] | None = None,
    per_layer: Mapping[str, float] | None = None,
    accuracy_rows: Sequence[Mapping[str, Any]] = (),
    dense_accuracy: float | None = None,
    title: str = "prunekit report",
    reference_label: str = "dense",
) -> dict[str, Path]:
    """Write ``report.html`` and its PNG plots into ``out_dir`` from whatever is given, and return the
    paths written.

    ``results`` are loaded results JSONs (the demo's, a recipe's, a sensitivity analysis, the
    sparse-inference benchmark's; see :func:`load_results`); each producer builds its own part. The
    other arguments add what a model gives: a sensitivity result (:func:`prunekit.sensitivity`), a
    :func:`measure_speed_size` dict, per-layer sparsities, and rows of accuracy against sparsity
    (:func:`accuracy_sweep`), with ``dense_accuracy`` the dotted reference line (``reference_label``
    names it). Sections: headline numbers, accuracy against sparsity, per-layer sparsity bars, then each
    part's sections (sensitivity curves, speed and size, every results table), and the settings; each
    appears when its data is there.

    ``out_dir`` is replaced as a whole (written as a temporary sibling, then renamed): it holds this
    report's complete files, or, if writing fails, the previous ones.
    """
    output = RunOutput(out_dir)
    kinds = [result_kind(data) for data in results]  # every file is checked before anything is written
    with output.replacing() as tmp:
        files = _write_page(tmp, title, kinds, results, sensitivity, speed_size, per_layer, accuracy_rows,
                            dense_accuracy, reference_label)
    return output.final(files, tmp)


def _write_page(out: Path, title: str, kinds: list[str], results: Sequence[Mapping[str, Any]], sensitivity: Any,
                speed_size: Mapping[str, Any] | None, per_layer: Mapping[str, float] | None,
                accuracy_rows: Sequence[Mapping[str, Any]], dense_accuracy: float | None,
                reference_label: str) -> dict[str, Path]:
    """Each result's part from its producer, merged, as one page in ``out``."""
    page = Parts(accuracy_rows=list(accuracy_rows), dense_accuracy=dense_accuracy, per_layer=per_layer,
                 reference_label=reference_label)
    tables = Parts()
    for kind, data in zip(kinds, results):
        if kind == "demo":
            page = page.merge(demo.report_parts(data))
        elif kind == "recipe":
            page = page.merge(recipe_run.report_parts(data))
        elif kind == "sensitivity":
            sensitivity = sensitivity or data
        elif kind == "sparse_inference":
            tables = tables.merge(_sparse_inference_parts(data))
        else:
            speed_size = speed_size or data
    if sensitivity is not None:
        page = page.merge(sensitivity_analysis.report_parts(sensitivity, out))
    if speed_size is not None:
        page = page.merge(_speed_size_parts(speed_size))
    return write_page(out, title, page.merge(tables))


def build_report(
    out_dir: str | os.PathLike,
    results_files: Sequence[str | os.PathLike] = (),
    *,
    recipe: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    sensitivity: bool = False,
    sweep: bool = False,
    sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
    target: float = 0.9,
    speed: bool = True,
    threads: int = 1,
    title: str | None = None,
    progress: bool = True,
    console: Any = None,
) -> dict[str, Path]:
    """What ``prunekit report`` does: load ``results_files`` and, with a ``recipe``, build its model
    (with ``weights``: a file written by ``prunekit.save``, dense or sparse) and test data, then measure
    what was asked (speed and size, a sensitivity analysis of test accuracy, an accuracy sweep of global
    and local magnitude pruning and, with the analysis, of its allocation), and write the report.

    Per-layer bars show the model's own sparsity when it is pruned, else the sensitivity allocation at
    ``target``. Everything given is checked before anything is measured.
    """
    loaded = [load_results(p)[1] for p in results_files]
    grid = [check_sparsity(s, "--sparsities") for s in sparsities]
    check_sparsity(target, "--target")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if (sensitivity or sweep or weights is not None) and recipe is None:
        raise ValueError("--sensitivity, --sweep and --weights need --recipe (the model's architecture and data)")
    require_matplotlib()
    model = test_set = example = None
    if recipe is not None:
        model, _, test_set, example = recipes.build_model_and_data(recipes.load_recipe(recipe))
        if weights is not None:
            recipes.load_weights(model, weights, "--weights")
        model.eval()
    if not loaded and model is None:
        raise ValueError("nothing to report: give results files (JSON) and/or --recipe")
    with RunOutput(out_dir):  # writable, and not in use by another run, before anything is measured
        return _measure_and_write(out_dir, loaded, model, test_set, example, sensitivity=sensitivity, sweep=sweep,
                                  grid=grid, target=target, speed=speed, threads=threads, title=title,
                                  progress=progress, console=console)


def _measure_and_write(out_dir, loaded, model, test_set, example, *, sensitivity, sweep, grid, target, speed, threads,
                       title, progress, console) -> dict[str, Path]:
    """:func:`build_report` once everything is checked: measure the model, then write the report."""
    extra: dict[str, Any] = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if model is not None:
            loader = torch.utils.data.DataLoader(test_set, batch_size=256)
            accuracy = lambda m: evaluate(m, loader)  # noqa: E731
            if sensitivity:
                extra["sensitivity"] = sensitivity_analysis.sensitivity(model, accuracy, grid, progress=progress,
                                                                        console=console)
            if sweep:
                extra["accuracy_rows"] = accuracy_sweep(model, accuracy, grid, sensitivity=extra.get("sensitivity"))
                extra["dense_accuracy"] = evaluate(model, loader)
                if masking.masks(model):  # the reference line is the pruned model given, not a dense one
                    extra["reference_label"] = f"the given model, {masking.sparsity(model):.1%} sparse"
            if masking.masks(model):
                extra["per_layer"] = masking.sparsity(model, per_layer=True)
            elif "sensitivity" in extra:
                extra["per_layer"] = extra["sensitivity"].allocate(sparsity=target)
            if speed:
                extra["speed_size"] = measure_speed_size(model, example, threads=threads)
    finally:
        torch.set_num_threads(previous)
    if title is None:
        names = [d.get("name") for d in loaded if isinstance(d.get("name"), str)]
        title = f"prunekit report: {names[0]}" if names else "prunekit report"
    return write_report(out_dir, results=loaded, title=title, **extra)
