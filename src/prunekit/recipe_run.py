"""Running a validated recipe: train, prune, fine-tune, measure, and write its model, results and report.

:func:`run_recipe` is what ``prunekit prune recipe.yaml`` runs; :mod:`prunekit.recipes` holds the schema
and every check, all made before anything here runs or is written. :func:`report_parts` turns a
recipe's ``results.json`` (``kind`` :data:`KIND`) into its part of a report page.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import masking, metrics
from .criteria import get_criterion
from .data import evaluate, loaders, make_optimizer, train
from .pruner import Pruner
from .pruning import prune
from .recipes import Prepared, Recipe, TrainSpec, build_schedule, final_sparsity, prepare
from .render import (Card, Column, Parts, Section, count, kib, percent, plural, seconds, table_html, times, write_json,
                     write_page)
from .outputs import RunOutput
from .serialization import save

__all__ = ["run_recipe", "report_parts", "KIND"]

#: the ``kind`` of a recipe's ``results.json`` (how ``prunekit report`` recognises it)
KIND = "prunekit.recipe"


def _optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    return make_optimizer(model, spec.optimizer, spec.lr, spec.weight_decay)


def _metrics(model: nn.Module, example: torch.Tensor, repeats: int) -> dict[str, Any]:
    return metrics.report_metrics(model, example, repeats=repeats)


def run_recipe(
    recipe: Recipe | str | Path,
    out_dir: str | Path | None = None,
    console: Any = None,
    latency_repeats: int = 10,
) -> dict[str, Any]:
    """Validate, then run a recipe: train (optional), prune (one-shot or on the schedule), fine-tune
    (optional), measure, and write ``model.safetensors``, ``results.json`` and ``report.html``.

    ``out_dir`` overrides ``output.dir``. Returns the results (what ``results.json`` holds).
    """
    from rich.console import Console  # lazily: `import prunekit` stays light

    start = time.perf_counter()
    prepared = prepare(recipe, out_dir)  # every check happens here, before anything runs or is written
    option = "--out" if out_dir is not None else "output.dir"
    previous_threads = torch.get_num_threads()
    if prepared.recipe.threads is not None:
        torch.set_num_threads(prepared.recipe.threads)
    try:
        # writable, and locked for this run (a second run into it refuses) before the work starts
        keep = [prepared.recipe.source] if prepared.recipe.source is not None else []
        with RunOutput(prepared.out_dir, option, keep) as output:
            return _run(prepared, output, console or Console(stderr=True), latency_repeats, start)
    finally:
        torch.set_num_threads(previous_threads)


def _run(prepared: Prepared, output: RunOutput, console: Any, latency_repeats: int, start: float) -> dict[str, Any]:
    recipe, model = prepared.recipe, prepared.model
    say = console.print
    p = recipe.prune

    train_loader, test_loader = loaders(prepared.train_set, prepared.test_set, recipe.data.batch_size, seed=recipe.seed)
    if recipe.train is not None and recipe.train.epochs > 0:
        say(f"training for {plural(recipe.train.epochs, 'epoch')}")
        train(model, train_loader, epochs=recipe.train.epochs, optimizer=_optimizer(model, recipe.train))
    before = {"accuracy": evaluate(model, test_loader), **_metrics(model, prepared.example, latency_repeats)}
    say(f"before pruning: accuracy {before['accuracy']:.2%}")

    criterion = get_criterion(p.method)
    calibration = None
    if criterion.needs_data:  # a fixed, seeded set of training batches
        calibration = loaders(prepared.train_set, prepared.test_set, recipe.data.batch_size, seed=recipe.seed)[0]
    common = dict(method=p.method, granularity=p.granularity, scope=p.scope, targets=p.targets,
                  exclude=p.exclude, group_norm=p.group_norm, max_layer_sparsity=p.max_layer_sparsity,
                  seed=recipe.seed, max_batches=p.calibration_batches)
    final = final_sparsity(recipe)
    epochs = recipe.finetune.epochs if recipe.finetune is not None else 0
    history: list[dict[str, Any]] = []
    pruned_accuracy = None
    schedule = build_schedule(recipe, final, len(train_loader)) if recipe.schedule is not None else None
    if schedule is None or schedule.prune_steps() == [0]:  # one-shot, before any fine-tuning
        prune_report = prune(model, final, data=calibration, **common).to_dict()
        pruned_accuracy = evaluate(model, test_loader)
        say(f"pruned to {masking.sparsity(model):.1%}: accuracy {pruned_accuracy:.2%}")
        if epochs:
            optimizer = _optimizer(model, recipe.finetune)
            for epoch in range(epochs):
                train(model, train_loader, epochs=1, optimizer=optimizer)
                history.append({"epoch": epoch + 1, "sparsity": masking.sparsity(model),
                                "accuracy": evaluate(model, test_loader)})
                say(f"fine-tuning epoch {epoch + 1}/{epochs}: accuracy {history[-1]['accuracy']:.2%}")
    else:
        pruner = Pruner(model, schedule, data=calibration, **common)
        optimizer = _optimizer(model, recipe.finetune)
        for epoch in range(epochs):
            train(model, train_loader, epochs=1, optimizer=optimizer, callback=lambda _step: pruner.step())
            history.append({"epoch": epoch + 1, "sparsity": masking.sparsity(model),
                            "accuracy": evaluate(model, test_loader)})
            say(f"epoch {epoch + 1}/{epochs}: sparsity {history[-1]['sparsity']:.1%}, "
                f"accuracy {history[-1]['accuracy']:.2%}")
        prune_report = pruner.history[-1].to_dict() if pruner.history else None

    after = {"accuracy": evaluate(model, test_loader), "sparsity": masking.sparsity(model),
             **_metrics(model, prepared.example, latency_repeats)}
    per_layer = masking.sparsity(model, per_layer=True)

    with output.replacing() as out:  # the folder is replaced as a whole when every file is written
        return _write(recipe, model, output, out, before, pruned_accuracy, after, per_layer, history, prune_report,
                      start)


def _write(recipe: Recipe, model: nn.Module, output: RunOutput, out: Path, before: dict, pruned_accuracy: float | None,
           after: dict, per_layer: dict, history: list, prune_report: dict | None, start: float) -> dict[str, Any]:
    """Write the model, the report and ``results.json`` into the temporary folder ``out`` that becomes
    ``output``'s folder; the results name the files where they will be."""
    files = {"results": out / "results.json"}
    if recipe.output.save:
        files["model"] = save(model, out / "model.safetensors", metadata={"recipe": recipe.title})
        after = {**after, "model_file_bytes": files["model"].stat().st_size}
    results = {
        "kind": KIND,
        "name": recipe.title,
        "recipe": str(recipe.source) if recipe.source else None,
        "before": before,
        "pruned_accuracy": pruned_accuracy,
        "after": after,
        "per_layer": per_layer,
        "history": history,
        "prune_report": prune_report,
        "settings": recipe.to_dict(),
        "wall_time_s": time.perf_counter() - start,
    }
    if recipe.output.report:
        # its own page shows the before/after numbers in a table; the accuracy plot is for comparisons
        parts = dataclasses.replace(report_parts(results), accuracy_rows=[])
        files.update(write_page(out, f"prunekit: {results['name']}", parts, settings_heading="Recipe",
                                subtitle=f"{recipe.prune.method} pruning, ran in {results['wall_time_s']:.1f} s"))
    results["files"] = {k: str(v) for k, v in output.final(files, out).items()}
    write_json(files["results"], results)
    return results


def report_parts(results: dict[str, Any]) -> Parts:
    """A recipe's part of a report (from its ``results.json``): headline numbers, the before/after
    table, the fine-tuning history, its accuracy points (dense, pruned, fine-tuned), the per-layer
    sparsity and the recipe itself as settings."""
    before, after = results["before"], results["after"]
    name = results.get("name") or "recipe"
    cards = [
        Card("accuracy before", percent(before["accuracy"]), f"{before['params_total']:,} parameters"),
        Card("accuracy after", percent(after["accuracy"]),
             f"{100 * (after['accuracy'] - before['accuracy']):+.1f} points"),
        Card("sparsity", percent(after["sparsity"]), f"of the pruned weights ({name})"),
        Card("compression", times(after["compression_ratio"]), "all parameters / non-zero ones"),
        Card("theoretical speedup", times(after["theoretical_speedup"]), "dense FLOPs / remaining FLOPs"),
    ]
    metric_rows = [
        {"metric": label, "before": fmt(before.get(key)), "after": fmt(after.get(key))}
        for label, key, fmt in [
            ("accuracy", "accuracy", percent),
            ("parameters", "params_total", count),
            ("non-zero parameters", "params_nonzero", count),
            ("compression", "compression_ratio", times),
            ("FLOPs (batch 1)", "flops_dense", count),
            ("FLOPs left", "flops_remaining", count),
            ("theoretical speedup", "theoretical_speedup", times),
            ("latency (batch 1)", "latency_s", seconds),
            ("file size, dense format (zeros stored)", "size_bytes", kib),
            ("file size, sparse format", "size_sparse_bytes", kib),
            ("model.safetensors as written", "model_file_bytes", kib),
        ]
    ]
    columns = [Column("metric"), Column("before", align="right"), Column("after", align="right")]
    sections = [Section("Before and after", table_html(metric_rows, columns),
                        note="Latency: median forward time at batch 1 of the finalized model, whose zeros are "
                        "stored in dense tensors, so unstructured sparsity does not make it faster. File sizes: the "
                        "model saved with prunekit.save in each format; model.safetensors is the file this run "
                        "wrote (dense format, masks included).")]
    if results.get("history"):
        sections.append(Section("Fine-tuning", table_html(results["history"], [
            Column("epoch"), Column("sparsity", format=percent), Column("accuracy", format=percent)])))
    # one point per sparsity and fine-tuning state: epochs at the same sparsity (one-shot pruning, then
    # fine-tuning) are one point, the last, or the line would jump up and down at one x
    tuned = {h["sparsity"]: h["accuracy"] for h in results.get("history", [])}
    tuned[after["sparsity"]] = after["accuracy"]
    points = [(0.0, before["accuracy"], False)] + [(s, a, True) for s, a in tuned.items()]
    if results.get("pruned_accuracy") is not None:
        points.append((after["sparsity"], results["pruned_accuracy"], False))
    settings = {k: v for k, v in results.get("settings", {}).items() if v is not None}
    return Parts(cards=cards, sections=sections, settings=settings, label="recipe",
                 accuracy_rows=[{"label": name, "sparsity": s, "accuracy": a, "finetuned": f} for s, a, f in points],
                 dense_accuracy=before["accuracy"], per_layer=results.get("per_layer"))
