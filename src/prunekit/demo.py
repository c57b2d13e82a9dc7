"""The demo experiment behind ``prunekit demo``: how far can LeNet-300-100 on digits be pruned?

It trains LeNet-300-100 on scikit-learn's 8x8 digits (seeded), then, for each sparsity of the grid, prunes
a copy of the trained dense model with each method (magnitude global and local, random, Taylor with a few
calibration batches), measures it, fine-tunes it for a few epochs (the masks keep pruned weights at zero)
and measures it again. It prints a table and writes ``results.json``, ``accuracy_vs_sparsity.png``,
``layer_sparsity.png`` and ``report.html`` into the output folder.

    from prunekit.demo import DemoConfig, run_demo, write_outputs
    results = run_demo(DemoConfig.quick())
    write_outputs(results, "prunekit-demo")
"""

from __future__ import annotations

import copy
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import masking, metrics
from ._version import __version__
from .criteria import get_criterion
from .data import digits, evaluate, loaders, train
from .models import LeNet300100
from .outputs import RunOutput
from .plots import require_matplotlib
from .pruning import prune
from .render import (Card, Column, Parts, Section, percent, plural, print_table, seconds, table_html, times, write_json,
                     write_page)

__all__ = ["DemoConfig", "run_demo", "write_outputs", "print_results", "demo", "report_parts", "RESULT_COLUMNS",
           "KIND", "readme_table"]

#: the ``kind`` of the demo's ``results.json`` (how ``prunekit report`` recognises it)
KIND = "prunekit.demo"


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does, in one place (recorded in ``results.json``)."""

    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    #: (method, scope) pairs, compared at every sparsity
    methods: tuple[tuple[str, str], ...] = (
        ("magnitude", "global"),
        ("magnitude", "local"),
        ("random", "global"),
        ("taylor", "global"),
    )
    train_epochs: int = 30
    train_lr: float = 3e-3
    finetune_epochs: int = 3
    finetune_lr: float = 3e-3
    batch_size: int = 64
    #: training batches used to score data-driven methods (taylor)
    calibration_batches: int = 4
    latency_repeats: int = 30
    #: torch threads while the demo runs: the model is tiny, so one thread beats several
    threads: int = 1
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """A reduced grid that runs in a few seconds (used by the tests)."""
        return cls(sparsities=(0.5, 0.9), train_epochs=8, finetune_epochs=1, latency_repeats=3, seed=seed)


#: the columns of the results table, in the terminal and in the HTML report
RESULT_COLUMNS = [
    Column("method"),
    Column("scope"),
    Column("sparsity", format=lambda v: percent(v, 0)),
    Column("finetuned", "fine-tuned"),
    Column("accuracy", format=percent),
    Column("compression_ratio", "compression", format=times),
    Column("theoretical_speedup", "speedup", format=times),
    Column("latency_s", "latency", format=seconds),
]


_MEASURED = ("compression_ratio", "theoretical_speedup", "latency_s")


def _measure(model: nn.Module, test_loader, example: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Accuracy, compression, theoretical speedup and latency (of the finalized model) of ``model``."""
    found = metrics.report_metrics(model, example, warmup=2, repeats=repeats)
    return {"accuracy": evaluate(model, test_loader), **{k: found[k] for k in _MEASURED}}


def run_demo(
    config: DemoConfig = DemoConfig(),
    progress: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Run the experiment and return ``{"kind", "settings", "dense", "rows", "wall_time_s"}`` (nothing is
    written; ``kind`` is :data:`KIND`).

    Each row: ``method``, ``scope``, ``sparsity`` (target), ``finetuned``, ``accuracy``,
    ``compression_ratio``, ``theoretical_speedup``, ``latency_s``, ``achieved_sparsity`` and
    ``per_layer`` (the pruned fraction of each weight).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        train_set, test_set = digits(split_seed=0)
        example = test_set.tensors[0][:1]

        def fresh_loaders():  # a new seeded shuffle for every run, so runs do not depend on their order
            return loaders(train_set, test_set, config.batch_size, seed=config.seed)

        total = 1 + len(config.methods) * len(config.sparsities)
        with Progress(
            TextColumn("{task.description:<38}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not progress,
            transient=False,
        ) as bar:
            task = bar.add_task("training LeNet-300-100 on digits", total=total)
            torch.manual_seed(config.seed)
            dense = LeNet300100(in_features=64, num_classes=10)
            train_loader, test_loader = fresh_loaders()
            train(dense, train_loader, epochs=config.train_epochs, lr=config.train_lr)
            dense_metrics = _measure(dense, test_loader, example, config.latency_repeats)
            dense_metrics["params"] = metrics.count_params(dense)[0]
            bar.advance(task)

            rows = []
            for sparsity in config.sparsities:
                for method, scope in config.methods:
                    bar.update(task, description=f"{method} {scope} at {sparsity:.0%}")
                    rows += _one_run(dense, method, scope, sparsity, config, fresh_loaders, example)
                    bar.advance(task)
            bar.update(task, description="done")
        return {
            "kind": KIND,
            "settings": {
                **asdict(config),
                "model": "LeNet-300-100 (64-300-100-10)",
                "data": f"scikit-learn digits, {len(train_set)} train / {len(test_set)} test",
                "optimizer": "adam",
                "latency": "median forward time at batch 1 of the finalized model (zeros stored densely)",
                "prunekit": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "dense": dense_metrics,
            "rows": rows,
            "wall_time_s": time.perf_counter() - start,
        }
    finally:
        torch.set_num_threads(previous_threads)


def _one_run(
    dense: nn.Module,
    method: str,
    scope: str,
    sparsity: float,
    config: DemoConfig,
    fresh_loaders: Callable,
    example: torch.Tensor,
) -> list[dict[str, Any]]:
    """Prune a copy of ``dense``; measure it, fine-tune it, measure it again. Two rows."""
    model = copy.deepcopy(dense)
    train_loader, test_loader = fresh_loaders()
    calibration = {"data": train_loader, "max_batches": config.calibration_batches}
    needs_data = get_criterion(method).needs_data
    prune(model, sparsity, method=method, scope=scope, seed=config.seed, **(calibration if needs_data else {}))
    rows = []
    for finetuned in (False, True):
        if finetuned:
            torch.manual_seed(config.seed)
            train(model, fresh_loaders()[0], epochs=config.finetune_epochs, lr=config.finetune_lr)
        rows.append({
            "method": method,
            "scope": scope,
            "sparsity": sparsity,
            "finetuned": finetuned,
            **_measure(model, test_loader, example, config.latency_repeats),
            "achieved_sparsity": masking.sparsity(model),
            "per_layer": masking.sparsity(model, per_layer=True),
        })
    return rows


# --- output --------------------------------------------------------------------------------------


def best_row(rows: Sequence[dict], near: float = 0.9) -> dict:
    """The most accurate row at the grid's sparsity closest to ``near``."""
    closest = min({r["sparsity"] for r in rows}, key=lambda s: abs(s - near))
    return max((r for r in rows if r["sparsity"] == closest), key=lambda r: r["accuracy"])


def sparsest_within(rows: Sequence[dict], dense_accuracy: float, tolerance: float = 0.01) -> dict | None:
    """The sparsest row within ``tolerance`` of the dense accuracy (the most accurate on ties)."""
    good = [r for r in rows if r["accuracy"] >= dense_accuracy - tolerance]
    return max(good, key=lambda r: (r["sparsity"], r["accuracy"])) if good else None


def _label(row: dict) -> str:
    return f"{row['method']} {row['scope']}, {'fine-tuned' if row['finetuned'] else 'no fine-tuning'}"


def report_parts(results: dict[str, Any]) -> Parts:
    """The demo's part of a report: headline numbers, the accuracy rows, the results table, the per-layer
    sparsity of the best run, and the settings."""
    rows, dense = results["rows"], results["dense"]
    best = best_row(rows)
    cards = [
        Card("dense accuracy", percent(dense["accuracy"]), f"{dense['params']:,} parameters"),
        Card(f"best at {best['sparsity']:.0%} sparsity", percent(best["accuracy"]), _label(best)),
        Card("compression", times(best["compression_ratio"]), "all parameters / non-zero ones"),
        Card("theoretical speedup", times(best["theoretical_speedup"]), "dense FLOPs / remaining FLOPs"),
    ]
    within = sparsest_within(rows, dense["accuracy"])
    if within is not None:
        cards.append(Card("sparsest within 1 point", percent(within["sparsity"], 0), _label(within)))
    settings = dict(results["settings"])
    if "wall_time_s" in results:
        settings["wall time"] = f"{results['wall_time_s']:.1f} s"
    table = Section(
        "Results",
        table_html(rows, RESULT_COLUMNS, highlight=lambda r: r is best),
        note="Compression counts every parameter (biases too). Speedup is the FLOP ratio at batch 1; "
        "latency is measured on the finalized model, whose zeros are stored in dense tensors, so "
        "unstructured sparsity does not make it faster (that needs sparse kernels or structured pruning).",
    )
    return Parts(cards=cards, sections=[table], settings=settings, accuracy_rows=rows,
                 dense_accuracy=dense["accuracy"], per_layer=best["per_layer"], label="demo",
                 accuracy_title="LeNet-300-100 on digits: accuracy vs sparsity",
                 layer_title=f"Sparsity per layer: {_label(best)} at {best['sparsity']:.0%}")


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, the two plots and ``report.html`` as the folder ``out_dir``, replaced as a
    whole: the folder holds this run's complete files, or, if writing fails, the previous ones."""
    output = RunOutput(out_dir)
    with output.replacing() as tmp:
        files = {"results": write_json(tmp / "results.json", results)}
        files.update(write_page(tmp, "prunekit demo: LeNet-300-100 on digits", report_parts(results),
                                subtitle=f"{len(results['rows'])} runs, dense accuracy "
                                         f"{percent(results['dense']['accuracy'])}"))
    return output.final(files, tmp)


#: the lines around the README's demo table, which :func:`readme_table` writes
README_BEGIN = "<!-- demo:table: written by benchmarks/demo_readme.py from benchmarks/results/demo.json -->"
README_END = "<!-- /demo:table -->"


def readme_table(results: dict[str, Any]) -> str:
    """The README's demo table (Markdown) from the demo's results: test accuracy without -> with
    fine-tuning for each method at each sparsity, then the compression and FLOP speedup there."""
    settings = results["settings"]
    methods = [tuple(m) for m in settings["methods"]]
    by_key = {(r["method"], r["scope"], r["sparsity"], r["finetuned"]): r for r in results["rows"]}
    head = ["sparsity", *(f"{method} {scope}" for method, scope in methods), "compression", "FLOP speedup"]
    lines = [
        f"Test accuracy (%), without → with {plural(settings['finetune_epochs'], 'epoch')} of fine-tuning; "
        f"dense accuracy {percent(results['dense']['accuracy'])}:",
        "",
        "| " + " | ".join(head) + " |",
        "|---:|" + "---|" * len(methods) + "---:|---:|",
    ]
    for sparsity in sorted({r["sparsity"] for r in results["rows"]}):
        cells = [percent(sparsity, 0)]
        for method, scope in methods:
            before, after = by_key[(method, scope, sparsity, False)], by_key[(method, scope, sparsity, True)]
            cells.append(f"{100 * before['accuracy']:.1f} → {100 * after['accuracy']:.1f}")
        first = by_key[(*methods[0], sparsity, True)]
        cells += [times(first["compression_ratio"]), times(first["theoretical_speedup"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([README_BEGIN, *lines, README_END])


def print_results(results: dict[str, Any], console: Any = None) -> None:
    """The results table (dense baseline first) in the terminal."""
    dense = {"method": "dense", "scope": "-", "sparsity": 0.0, "finetuned": None, **results["dense"]}
    print_table([dense, *results["rows"]], RESULT_COLUMNS, title="LeNet-300-100 on digits", console=console)


def demo(
    out_dir: str | os.PathLike = "prunekit-demo",
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    console: Any = None,
    threads: int = 1,
) -> dict[str, Any]:
    """What ``prunekit demo`` does: run, print the table, write the files. Returns the results, with
    ``"files"`` (the paths written) added."""
    require_matplotlib()  # fail before training, not after
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    config = replace(DemoConfig.quick(seed) if quick else DemoConfig(seed=seed), threads=threads)
    with RunOutput(out_dir):  # checked and locked before the work: a second demo into it refuses
        results = run_demo(config, progress=progress, console=console)
        print_results(results, console)
        files = write_outputs(results, out_dir)
    results["files"] = {k: str(v) for k, v in files.items()}
    return results
