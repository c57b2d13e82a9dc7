"""Tables, plots and a self-contained HTML report, for the demo, recipes and your own experiments.

* :func:`print_table`: rows of dicts as a ``rich`` table, numbers right-aligned and formatted.
* :func:`plot_accuracy_vs_sparsity`, :func:`plot_layer_sparsity`: PNG files (matplotlib, Agg backend,
  imported only when a plot is made; ``pip install "prunekit[demo]"`` provides it).
* :func:`write_html`: one HTML file with inline CSS and the PNGs embedded as base64 data URIs, so it
  can be mailed or moved on its own. Build the body from :func:`headline_html`, :func:`image_html`,
  :func:`table_html` and :func:`settings_html`, each a :class:`Section`.
* :func:`write_report` (what ``prunekit report`` runs): a whole report from results JSONs (the demo's,
  a recipe's, a sensitivity analysis, the sparse-inference benchmark) and what a model gives
  (:func:`measure_speed_size`, :func:`accuracy_sweep`, :func:`plot_sensitivity` of ``pk.sensitivity``).

Example::

    from prunekit import report
    cols = [report.Column("method"), report.Column("accuracy", format=report.percent)]
    report.print_table(rows, cols)
    report.write_html("report.html", "My run", [
        report.Section("Results", report.table_html(rows, cols)),
        report.Section("Accuracy", report.image_html("accuracy.png")),
    ])
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
]


# --- formatting ----------------------------------------------------------------------------------


def percent(value: Any, digits: int = 1) -> str:
    """``0.9123 -> "91.2%"``; ``None -> "-"``."""
    return "-" if value is None else f"{float(value):.{digits}%}"


def times(value: Any, digits: int = 1) -> str:
    """A ratio: ``9.32 -> "9.3×"``; infinity prints as ``"∞"``."""
    if value is None:
        return "-"
    return "∞" if math.isinf(value) else f"{float(value):.{digits}f}×"


def seconds(value: Any) -> str:
    """``0.000231 -> "231 µs"``."""
    if value is None:
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def _default_format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class Column:
    """One column of a table: which row key, its header, how to format it, how to align it.

    ``align=None`` right-aligns numbers and left-aligns everything else.
    """

    key: str
    header: str | None = None
    format: Callable[[Any], str] = _default_format
    align: str | None = None

    @property
    def title(self) -> str:
        return self.header if self.header is not None else self.key.replace("_", " ")

    def cell(self, row: Mapping[str, Any]) -> str:
        return self.format(row.get(self.key))

    def alignment(self, rows: Sequence[Mapping[str, Any]]) -> str:
        if self.align is not None:
            return self.align
        values = [r.get(self.key) for r in rows if r.get(self.key) is not None]
        numeric = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        return "right" if numeric else "left"


def _columns(columns: Sequence[Column | str]) -> list[Column]:
    return [c if isinstance(c, Column) else Column(c) for c in columns]


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column | str],
    title: str | None = None,
    console: Any = None,
) -> None:
    """Print ``rows`` (dicts) as a ``rich`` table with the given columns (``Column`` or key names)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    cols = _columns(columns)
    cells = [[col.cell(row) for col in cols] for row in rows]
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for i, col in enumerate(cols):
        width = max([len(col.title)] + [len(r[i]) for r in cells])
        table.add_column(col.title, justify=col.alignment(rows), no_wrap=True, min_width=width)
    for row_cells in cells:
        table.add_row(*row_cells)
    console = console or Console()
    needed = console.measure(table, options=console.options.update_width(10_000)).maximum
    if console.is_terminal or needed <= console.width:
        console.print(table)
        return
    previous = console.width  # a file or a pipe: never crop a column to fit 80 characters
    console.width = needed
    try:
        console.print(table)
    finally:
        console.width = previous


# --- plots ---------------------------------------------------------------------------------------


def require_matplotlib():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or an ImportError saying what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            f'plots need matplotlib ({error}); install it with: pip install "prunekit[demo]"'
        ) from None
    return plt


_COLORS = ["#1f77b4", "#d62728", "#7f7f7f", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def plot_accuracy_vs_sparsity(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    dense_accuracy: float | None = None,
    title: str = "Accuracy vs sparsity",
) -> Path:
    """Accuracy against sparsity, one colour per ``label`` (default ``"method (scope)"``), a solid line
    for fine-tuned rows and a dashed one for the others; the dense accuracy as a horizontal line.

    Rows need ``sparsity``, ``accuracy``, ``finetuned`` and either ``label`` or ``method``/``scope``.
    """
    plt = require_matplotlib()
    series: dict[str, dict[bool, list[tuple[float, float]]]] = {}
    for row in rows:
        label = row.get("label") or f"{row['method']} ({row['scope']})"
        series.setdefault(label, {}).setdefault(bool(row.get("finetuned")), []).append(
            (float(row["sparsity"]), float(row["accuracy"]))
        )
    from matplotlib.lines import Line2D

    xs_all = sorted({x for by_ft in series.values() for pts in by_ft.values() for x, _ in pts})
    logit = all(0.0 < x < 1.0 for x in xs_all)  # spreads out 90%, 95%, 98% ...
    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    try:
        handles = []
        for i, (label, by_ft) in enumerate(series.items()):
            color = _COLORS[i % len(_COLORS)]
            for finetuned, points in sorted(by_ft.items()):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, [100 * y for y in ys], color=color, linestyle="-" if finetuned else "--",
                        marker="o" if finetuned else "x", markersize=5)
            handles.append(Line2D([], [], color=color, linewidth=3, label=label))
        handles += [
            Line2D([], [], color="black", linestyle="-", marker="o", label="fine-tuned"),
            Line2D([], [], color="black", linestyle="--", marker="x", label="no fine-tuning"),
        ]
        if dense_accuracy is not None:
            ax.axhline(100 * dense_accuracy, color="black", linewidth=1, linestyle=":")
            handles.append(Line2D([], [], color="black", linestyle=":", label=f"dense ({100 * dense_accuracy:.1f}%)"))
        if logit:
            ax.set_xscale("logit")
            ax.minorticks_off()
        ax.set_xticks(xs_all, [f"{100 * x:g}%" for x in xs_all])
        ax.set_xlabel("sparsity (fraction of weights pruned" + (", logit scale)" if logit else ")"))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.set_ylim(0, 100)
        _legend_outside_and_save(fig, ax, handles, path)
    finally:
        plt.close(fig)
    return Path(path)


def plot_layer_sparsity(
    per_layer: Mapping[str, float],
    path: str | os.PathLike,
    title: str = "Sparsity per layer",
) -> Path:
    """Horizontal bars: the fraction of each layer's weights that is pruned, first layer on top."""
    plt = require_matplotlib()
    names = list(per_layer)
    values = [100 * float(per_layer[n]) for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.4), dpi=110)
    try:
        bars = ax.barh(range(len(names)), values, color="#1f77b4")
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("pruned (%)")
        ax.set_title(title)
        for bar, value in zip(bars, values):
            inside = value > 85
            ax.text(value - 1 if inside else value + 1, bar.get_y() + bar.get_height() / 2, f"{value:.1f}%",
                    va="center", ha="right" if inside else "left", fontsize=8,
                    color="white" if inside else "black")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return Path(path)


# --- HTML ----------------------------------------------------------------------------------------


@dataclass
class Section:
    """A heading and an HTML body (from the ``*_html`` helpers, already escaped)."""

    heading: str
    body: str
    note: str = ""


@dataclass
class Card:
    """One headline number: a label, a big value and a small note."""

    label: str
    value: str
    note: str = ""


def headline_html(cards: Iterable[Card | tuple[str, str] | tuple[str, str, str]]) -> str:
    """A row of big numbers."""
    parts = []
    for card in cards:
        card = card if isinstance(card, Card) else Card(*card)
        parts.append(
            '<div class="card">'
            f'<div class="label">{html.escape(card.label)}</div>'
            f'<div class="value">{html.escape(card.value)}</div>'
            f'<div class="note">{html.escape(card.note)}</div></div>'
        )
    return f'<div class="cards">{"".join(parts)}</div>'


def image_html(png: str | os.PathLike | bytes, alt: str = "") -> str:
    """An ``<img>`` with the PNG embedded as a base64 data URI."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def table_html(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column | str],
    highlight: Callable[[Mapping[str, Any]], bool] | None = None,
) -> str:
    """A table; numeric columns are right-aligned, rows for which ``highlight(row)`` is true are marked."""
    cols = _columns(columns)
    aligns = [col.alignment(rows) for col in cols]
    head = "".join(f'<th class="{a}">{html.escape(c.title)}</th>' for c, a in zip(cols, aligns))
    body = []
    for row in rows:
        cls = ' class="best"' if highlight is not None and highlight(row) else ""
        cells = "".join(f'<td class="{a}">{html.escape(c.cell(row))}</td>' for c, a in zip(cols, aligns))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def settings_html(settings: Mapping[str, Any]) -> str:
    """Key/value pairs; nested values are shown as compact JSON."""
    items = []
    for key, value in settings.items():
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        items.append(f"<dt>{html.escape(str(key))}</dt><dd><code>{html.escape(shown)}</code></dd>")
    return f'<dl class="settings">{"".join(items)}</dl>'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:960px;margin:0 auto;padding:24px}
h1{font-size:1.6rem;margin:0 0 4px}
.subtitle{color:#5b6475;margin:0 0 20px}
section{background:#fff;border-radius:10px;padding:16px 20px;margin:0 0 18px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{font-size:1.1rem;margin:0 0 12px}
.note{color:#5b6475;font-size:.85rem}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{flex:1 1 180px;border:1px solid #e3e6eb;border-radius:8px;padding:12px 14px}
.card .label{color:#5b6475;font-size:.8rem;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:1.7rem;font-weight:600;margin:4px 0}
img{max-width:100%;height:auto;display:block;margin:0 auto}
table{border-collapse:collapse;width:100%;font-size:.88rem}
th,td{padding:5px 8px;border-bottom:1px solid #eceff3}
th{background:#f0f2f5;position:sticky;top:0}
td.right,th.right{text-align:right;font-variant-numeric:tabular-nums}
td.left,th.left{text-align:left}
tr.best td{background:#eaf6ec;font-weight:600}
tbody tr:hover td{background:#f5f8ff}
dl.settings{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
dt{font-weight:600}dd{margin:0}code{font-size:.85rem;word-break:break-word}
footer{color:#8a92a3;font-size:.8rem;text-align:center;padding:8px}
"""


def write_html(
    path: str | os.PathLike,
    title: str,
    sections: Sequence[Section],
    subtitle: str = "",
) -> Path:
    """Write a self-contained HTML report (inline CSS, embedded images) and return its path."""
    from . import __version__

    parts = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="subtitle">{html.escape(subtitle)}</p>')
    for section in sections:
        note = f'<p class="note">{html.escape(section.note)}</p>' if section.note else ""
        parts.append(f"<section><h2>{html.escape(section.heading)}</h2>{section.body}{note}</section>")
    parts.append(f"<footer>made with prunekit {html.escape(__version__)}</footer>")
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(parts)}</main></body></html>\n"
    )
    path = Path(path)
    path.write_text(document, encoding="utf-8")
    return path



def json_safe(value: Any) -> Any:
    """JSON has no infinity or NaN: non-finite floats become ``None`` (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON (non-finite floats as null)."""
    path = Path(path)
    path.write_text(json.dumps(json_safe(data), indent=2) + "\n", encoding="utf-8")
    return path


# --- sensitivity curves, speed and size, whole reports ---------------------------------------------


def _sensitivity_result(result: Any):
    from .sensitivity_analysis import SensitivityResult

    return result if isinstance(result, SensitivityResult) else SensitivityResult.from_dict(result)


def _as_percent(result) -> bool:
    values = [result.baseline, *(v for vs in result.curves.values() for v in vs)]
    return result.metric == "accuracy" and all(0.0 <= v <= 1.0 for v in values)


def plot_sensitivity(
    result: Any,
    path: str | os.PathLike,
    title: str = "Sensitivity: each layer pruned alone",
) -> Path:
    """The metric against sparsity with one layer at a time pruned (a :class:`~prunekit.SensitivityResult`
    or its dict), one line per layer (its number of weights in the legend), the unpruned model dotted."""
    result = _sensitivity_result(result)
    plt = require_matplotlib()
    from matplotlib.lines import Line2D

    scale = 100.0 if _as_percent(result) else 1.0
    xs = result.sparsities
    logit = all(0.0 < x < 1.0 for x in xs) and len(xs) > 1
    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    try:
        handles = []
        for i, (name, values) in enumerate(result.curves.items()):
            color = _COLORS[i % len(_COLORS)]
            style = "-" if i < len(_COLORS) else "--"
            ax.plot(xs, [scale * v for v in values], color=color, linestyle=style, marker="o", markersize=4)
            handles.append(Line2D([], [], color=color, linestyle=style, linewidth=2,
                                  label=f"{name} ({result.sizes.get(name, 0):,})"))
        ax.axhline(scale * result.baseline, color="black", linewidth=1, linestyle=":")
        handles.append(Line2D([], [], color="black", linestyle=":", label="unpruned"))
        if logit:
            ax.set_xscale("logit")
            ax.minorticks_off()
        ax.set_xticks(xs, [f"{100 * x:g}%" for x in xs])
        ax.set_xlabel("sparsity of the one pruned layer" + (" (logit scale)" if logit else ""))
        label = result.metric + (" (%)" if scale == 100.0 else "")
        ax.set_ylabel(label + ("" if result.higher_is_better else ", lower is better"))
        ax.set_title(f"{title} ({result.method}, {result.granularity})")
        _legend_outside_and_save(fig, ax, handles, path)
    finally:
        plt.close(fig)
    return Path(path)


def measure_speed_size(
    model: Any,
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
    from . import export, metrics

    total, nonzero = metrics.count_params(model)
    flops_dense, flops_remaining = metrics.flops(model, example_inputs)
    out: dict[str, Any] = {
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
        import warnings

        plan = export.plan_sparsity(model, example_inputs, threads=threads)
        with warnings.catch_warnings():  # "measured slower as a whole": the plan records it (reverted)
            warnings.simplefilter("ignore", UserWarning)
            export.sparsify(model, example_inputs, plan=plan)
        out["plan"] = plan.to_dict()
    if plan is not None and plan.converted and not plan.reverted:
        out["converted_layers"] = plan.converted
        out["latency_dense_s"], out["latency_sparse_s"] = plan.model_dense_s, plan.model_sparse_s
    else:
        dense = metrics.latency(metrics._deployed(model), example_inputs, repeats=repeats, threads=threads)
        out["latency_dense_s"] = out["latency_sparse_s"] = dense
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def _kib(value: Any) -> str:
    return "-" if value is None else f"{value / 1024:,.1f} KiB"


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


SPEED_SIZE_COLUMNS = [Column("quantity"), Column("dense", align="right"), Column("pruned", align="right"),
                      Column("gain", align="right")]


def speed_size_rows(measured: Mapping[str, Any]) -> list[dict[str, str]]:
    """The speed and size table, from :func:`measure_speed_size` (or a recipe's before/after metrics,
    see :func:`write_report`): dense and pruned side by side, and the gain (dense / pruned)."""
    m = measured
    rows = [
        {"quantity": "parameters (non-zero)", "dense": _count(m.get("params_total")),
         "pruned": _count(m.get("params_nonzero")), "gain": times(_ratio(m.get("params_total"), m.get("params_nonzero")))},
        {"quantity": "file size", "dense": _kib(m.get("size_dense_bytes")), "pruned": _kib(m.get("size_sparse_bytes")),
         "gain": times(_ratio(m.get("size_dense_bytes"), m.get("size_sparse_bytes")))},
        {"quantity": "FLOPs per example", "dense": _count(m.get("flops_dense")), "pruned": _count(m.get("flops_remaining")),
         "gain": times(_ratio(m.get("flops_dense"), m.get("flops_remaining")))},
        {"quantity": "latency", "dense": seconds(m.get("latency_dense_s")), "pruned": seconds(m.get("latency_sparse_s")),
         "gain": times(_ratio(m.get("latency_dense_s"), m.get("latency_sparse_s")), 2)},
    ]
    return rows


def _recipe_speed_size(results: Mapping[str, Any]) -> dict[str, Any]:
    before, after = results["before"], results["after"]
    return {
        "params_total": before.get("params_total"), "params_nonzero": after.get("params_nonzero"),
        "size_dense_bytes": before.get("size_bytes"), "size_sparse_bytes": after.get("size_sparse_bytes"),
        "flops_dense": before.get("flops_dense"), "flops_remaining": after.get("flops_remaining"),
        "latency_dense_s": before.get("latency_s"), "latency_sparse_s": after.get("latency_s"),
    }


BENCHMARK_COLUMNS = [
    Column("sparsity", format=lambda v: percent(v, 0)),
    Column("batch"),
    Column("dense_s", "dense", format=seconds),
    Column("sparse_s", "sparse (CSR)", format=seconds),
    Column("speedup", format=lambda v: times(v, 2)),
    Column("ideal", "ideal 1/(1-s)", format=lambda v: times(v, 0)),
    Column("sparsify", "sparsify picks"),
]


def result_kind(data: Mapping[str, Any]) -> str:
    """What a results JSON holds: ``"demo"``, ``"recipe"``, ``"sensitivity"``, ``"sparse_inference"``,
    ``"speed_size"``; ``ValueError`` for anything else."""
    if not isinstance(data, Mapping):
        raise ValueError("a results file must hold a JSON object")
    if data.get("kind") == "prunekit.sensitivity":
        return "sensitivity"
    if "rows" in data and "dense" in data:
        return "demo"
    if "before" in data and "after" in data:
        return "recipe"
    if "linear" in data and "settings" in data:
        return "sparse_inference"
    if "size_sparse_bytes" in data and "latency_dense_s" in data:
        return "speed_size"
    raise ValueError("not a prunekit results file (expected the JSON of `prunekit demo`, a recipe's results.json, "
                     "a sensitivity analysis or benchmarks/sparse_inference.py)")


def load_results(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(kind, data)`` of a results JSON file (see :func:`result_kind`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path.name} is not valid JSON ({error})") from None
    try:
        return result_kind(data), data
    except ValueError as error:
        raise ValueError(f"{path.name}: {error}") from None


def accuracy_sweep(
    model: Any,
    evaluate: Callable[[Any], float],
    sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
    scopes: Sequence[str] = ("global", "local"),
    method: str = "magnitude",
    sensitivity: Any = None,
) -> list[dict[str, Any]]:
    """Rows for :func:`plot_accuracy_vs_sparsity`: ``evaluate`` of a copy of ``model`` pruned at each
    sparsity with each scope (no fine-tuning), plus the sensitivity allocation when a result is given.
    Rows carry ``per_layer`` sparsities too."""
    import copy

    from . import masking
    from .pruning import prune

    rows = []
    labelled = [(scope, scope) for scope in scopes]
    if sensitivity is not None:
        labelled.append(("sensitivity", _sensitivity_result(sensitivity)))
    for sparsity in sparsities:
        for name, scope in labelled:
            pruned = copy.deepcopy(model)
            if name == "sensitivity":
                prune(pruned, scope=scope.allocate(sparsity=sparsity))
            else:
                prune(pruned, sparsity, method=method, scope=scope)
            rows.append({"label": f"{method} ({name})", "method": method, "scope": name, "sparsity": sparsity,
                         "finetuned": False, "accuracy": float(evaluate(pruned)),
                         "per_layer": masking.sparsity(pruned, per_layer=True)})
    return rows


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
) -> dict[str, Path]:
    """Write ``report.html`` and its PNG plots into ``out_dir`` from whatever is given, and return the
    paths written.

    ``results`` are loaded results JSONs (the demo's, a recipe's, a sensitivity analysis, the
    sparse-inference benchmark's; see :func:`load_results`). The other arguments add what a model gives:
    a sensitivity result (:func:`prunekit.sensitivity`), a :func:`measure_speed_size` dict, per-layer
    sparsities, and rows of accuracy against sparsity (:func:`accuracy_sweep`). Sections: headline
    numbers, accuracy against sparsity, per-layer sparsity bars, sensitivity curves, the speed and size
    table, and every results table; each appears when its data is there.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    accuracy_rows = list(accuracy_rows)
    tables: list[Section] = []
    settings: dict[str, Any] = {}
    cards: list[Card] = []
    for data in results:
        kind = result_kind(data)
        if kind == "demo":
            from .demo import RESULT_COLUMNS, best_row

            accuracy_rows += data["rows"]
            dense_accuracy = data["dense"]["accuracy"] if dense_accuracy is None else dense_accuracy
            best = best_row(data["rows"])
            per_layer = per_layer or best["per_layer"]
            cards.append(Card(f"best at {best['sparsity']:.0%}", percent(best["accuracy"]),
                              f"{best['method']} {best['scope']}"))
            tables.append(Section("Demo results", table_html(data["rows"], RESULT_COLUMNS)))
            settings.update({f"demo {k}": v for k, v in data.get("settings", {}).items()})
        elif kind == "recipe":
            before, after = data["before"], data["after"]
            label = data.get("name") or "recipe"
            points = [(0.0, before["accuracy"], False), (after["sparsity"], after["accuracy"], True)]
            if data.get("pruned_accuracy") is not None:
                points.append((after["sparsity"], data["pruned_accuracy"], False))
            points += [(h["sparsity"], h["accuracy"], True) for h in data.get("history", [])[:-1]]
            accuracy_rows += [{"label": label, "sparsity": s, "accuracy": a, "finetuned": f} for s, a, f in points]
            dense_accuracy = before["accuracy"] if dense_accuracy is None else dense_accuracy
            per_layer = per_layer or data.get("per_layer")
            speed_size = speed_size or _recipe_speed_size(data)
            cards += [Card("accuracy after", percent(after["accuracy"]),
                           f"{100 * (after['accuracy'] - before['accuracy']):+.1f} points"),
                      Card("sparsity", percent(after["sparsity"]), label)]
            settings.update({f"recipe {k}": v for k, v in data.get("settings", {}).items() if v is not None})
        elif kind == "sensitivity":
            sensitivity = sensitivity or data
        elif kind == "sparse_inference":
            setup = data["settings"]
            tables.append(Section(
                f"Sparse kernels: {setup.get('layer')}, {setup.get('threads')} thread(s)",
                table_html(data["linear"], BENCHMARK_COLUMNS),
                note="Median time per call, dense vs torch.sparse CSR, measured interleaved; ideal = 1 / (1 - "
                     "sparsity). sparsify converts a layer only when it measures at least 1.1x faster."))
        else:  # a measure_speed_size dict saved as JSON
            speed_size = speed_size or data

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    sections: list[Section] = []
    if speed_size is not None:
        cards += [Card("file size", times(_ratio(speed_size.get("size_dense_bytes"), speed_size.get("size_sparse_bytes"))),
                       "smaller, sparse format"),
                  Card("measured speedup", times(_ratio(speed_size.get("latency_dense_s"),
                                                        speed_size.get("latency_sparse_s")), 2), "sparse kernels")]
    if cards:
        sections.append(Section("Headline", headline_html(cards)))
    if accuracy_rows:
        files["accuracy_plot"] = plot_accuracy_vs_sparsity(accuracy_rows, out / "accuracy_vs_sparsity.png",
                                                           dense_accuracy)
        sections.append(Section("Accuracy against sparsity", image_html(files["accuracy_plot"], "accuracy against sparsity"),
                                note="Dashed: right after pruning; solid: after fine-tuning. Dotted: the dense model."))
    if per_layer:
        files["layer_plot"] = plot_layer_sparsity(per_layer, out / "layer_sparsity.png")
        sections.append(Section("Sparsity per layer", image_html(files["layer_plot"], "pruned fraction per layer")))
    if sensitivity is not None:
        result = _sensitivity_result(sensitivity)
        files["sensitivity_plot"] = plot_sensitivity(result, out / "sensitivity.png")
        cols = [Column("layer"), Column("size", format=_count)] + [
            Column(f"{100 * s:g}%", format=percent if _as_percent(result) else _default_format)
            for s in result.sparsities]
        sections.append(Section("Sensitivity of each layer", image_html(files["sensitivity_plot"], "sensitivity curves")
                                + table_html(result.rows(), cols),
                                note=f"{result.metric} with one layer pruned alone ({result.method}); unpruned: "
                                     f"{result.baseline:.4g}. Flat curves can be pruned hard; steep ones are fragile."))
    if speed_size is not None:
        converted = speed_size.get("converted_layers") or []
        note = ("Dense: the finalized model, zeros stored. Pruned: non-zero parameters, the compressed file "
                "(format='sparse'), FLOPs left, and the latency of prunekit.export.sparsify's model"
                + (f" ({len(converted)} layers on sparse kernels)." if converted else " (no layer was faster on "
                   "sparse kernels, so it stays dense)."))
        sections.append(Section("Speed and size", table_html(speed_size_rows(speed_size), SPEED_SIZE_COLUMNS), note=note))
    sections += tables
    if settings:
        sections.append(Section("Settings", settings_html(settings)))
    if not sections:
        raise ValueError("nothing to report: give results files, a model, or a sensitivity analysis")
    files["report"] = write_html(out / "report.html", title, sections,
                                 subtitle=f"{len(files)} plot(s); every image is embedded in this file")
    return files


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
    import torch

    from .scope import check_sparsity

    loaded = [load_results(p)[1] for p in results_files]
    grid = [check_sparsity(s, "--sparsities") for s in sparsities]
    check_sparsity(target, "--target")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if (sensitivity or sweep or weights is not None) and recipe is None:
        raise ValueError("--sensitivity, --sweep and --weights need --recipe (the model's architecture and data)")
    require_matplotlib()
    model = None
    if recipe is not None:
        from .recipes import build_model_and_data, load_recipe
        from .serialization import load

        model, _, test_set, example = build_model_and_data(load_recipe(recipe))
        if weights is not None:
            load(model, weights)
        model.eval()
    if not loaded and model is None:
        raise ValueError("nothing to report: give results files (JSON) and/or --recipe")

    extra: dict[str, Any] = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if model is not None:
            from . import masking
            from .data import evaluate
            from .sensitivity_analysis import sensitivity as analyse

            loader = torch.utils.data.DataLoader(test_set, batch_size=256)
            accuracy = lambda m: evaluate(m, loader)  # noqa: E731
            if sensitivity:
                extra["sensitivity"] = analyse(model, accuracy, grid, progress=progress, console=console)
            if sweep:
                extra["accuracy_rows"] = accuracy_sweep(model, accuracy, grid, sensitivity=extra.get("sensitivity"))
                extra["dense_accuracy"] = evaluate(model, loader)
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


def _legend_outside_and_save(fig, ax, handles, path: str | os.PathLike) -> None:
    """The plots' shared finish: light grid, legend to the right of the axes, PNG written."""
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")
