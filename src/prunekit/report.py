"""Tables, plots and a self-contained HTML report, for the demo, recipes and your own experiments.

* :func:`print_table`: rows of dicts as a ``rich`` table, numbers right-aligned and formatted.
* :func:`plot_accuracy_vs_sparsity`, :func:`plot_layer_sparsity`: PNG files (matplotlib, Agg backend,
  imported only when a plot is made; ``pip install "prunekit[demo]"`` provides it).
* :func:`write_html`: one HTML file with inline CSS and the PNGs embedded as base64 data URIs, so it
  can be mailed or moved on its own. Build the body from :func:`headline_html`, :func:`image_html`,
  :func:`table_html` and :func:`settings_html`, each a :class:`Section`.

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
        ax.grid(True, alpha=0.3)
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        fig.savefig(path, format="png")
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
