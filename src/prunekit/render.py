"""Render what it is given as tables, HTML pages and JSON: the leaf every report is built from.

It imports only other leaves (the formatters of ``_format``, :mod:`prunekit.fileio` for atomic writes,
:mod:`prunekit.plots` for the page's shared plots), so every producer (the demo, recipes, a sensitivity
analysis, ``prunekit report``) can build its sections with it.

* :func:`print_table`: rows of dicts as a ``rich`` table, numbers right-aligned and formatted.
* :func:`headline_html`, :func:`image_html`, :func:`table_html`, :func:`settings_html`: the bodies of a
  :class:`Section`; :func:`write_html` writes one self-contained HTML file (inline CSS, PNGs embedded
  as base64 data URIs, so it can be mailed or moved on its own).
* :class:`Parts` and :func:`write_page`: the one page builder. A producer returns its parts (headline
  cards, sections, settings, and the data of the shared plots: accuracy against sparsity, sparsity per
  layer); parts from several producers merge into one page.
* :func:`write_json`: results as JSON (non-finite floats as null).

Example::

    from prunekit import render
    cols = [render.Column("method"), render.Column("accuracy", format=render.percent)]
    render.print_table(rows, cols)
    render.write_html("report.html", "My run", [render.Section("Results", render.table_html(rows, cols))])
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._format import format_percent as percent
from ._format import format_ratio as times
from ._format import format_seconds as seconds
from ._version import __version__
from .fileio import atomic_write
from .plots import plot_accuracy_vs_sparsity, plot_layer_sparsity, series_label, series_styles

__all__ = [
    "Column",
    "Section",
    "Card",
    "Parts",
    "percent",
    "times",
    "seconds",
    "count",
    "kib",
    "ratio",
    "plural",
    "print_table",
    "headline_html",
    "image_html",
    "table_html",
    "settings_html",
    "write_html",
    "write_page",
    "write_json",
    "json_safe",
    "speed_size_rows",
    "speed_size_cards",
    "SPEED_SIZE_COLUMNS",
]


# --- formatting ----------------------------------------------------------------------------------


def plural(n: int, word: str) -> str:
    """``plural(1, "epoch") -> "1 epoch"``, ``plural(3, "epoch") -> "3 epochs"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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
    # the wrapper scrolls a wide table sideways inside its section instead of widening the page
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


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
.table{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;width:100%;font-size:.88rem}
th,td{padding:5px 8px;border-bottom:1px solid #eceff3}
th{background:#f0f2f5;position:sticky;top:0}
td.right,th.right{text-align:right;font-variant-numeric:tabular-nums}
td.left,th.left{text-align:left}
tr.best td{background:#eaf6ec;font-weight:600}
tbody tr:hover td{background:#f5f8ff}
dl.settings{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:4px 16px;margin:0}
dd{min-width:0}
@media (max-width:640px){main{padding:8px}section{padding:10px 12px}dl.settings{grid-template-columns:minmax(0,1fr)}}
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
    return atomic_write(path, document)



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
    """Write ``data`` as indented JSON (non-finite floats as null), atomically."""
    return atomic_write(path, json.dumps(json_safe(data), indent=2) + "\n")


# --- the page builder -----------------------------------------------------------------------------


@dataclass
class Parts:
    """What one producer puts on a report page.

    ``cards`` are headline numbers, ``sections`` its own sections (tables, its own plots), ``settings``
    what it ran with. The shared plots are drawn by :func:`write_page` from the data of every part:
    ``accuracy_rows`` (rows of :func:`~prunekit.plots.plot_accuracy_vs_sparsity`) with
    ``dense_accuracy``, and ``per_layer`` (``{layer: pruned fraction}``). ``files`` are the files the
    producer wrote for its sections (its own plots). ``label`` prefixes the settings' keys when parts of
    several producers share a page.
    """

    cards: list[Card] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    accuracy_rows: list[Mapping[str, Any]] = field(default_factory=list)
    dense_accuracy: float | None = None
    per_layer: Mapping[str, float] | None = None
    files: dict[str, Path] = field(default_factory=dict)
    label: str = ""
    reference_label: str = "dense"
    accuracy_title: str = "Accuracy vs sparsity"
    layer_title: str = "Sparsity per layer"

    def merge(self, other: Parts) -> Parts:
        """Both parts on one page: lists concatenated, settings prefixed by their labels, and for the
        single values (dense accuracy, per-layer sparsity, plot titles) the first one given."""
        def prefixed(parts: Parts) -> dict[str, Any]:
            return {f"{parts.label} {k}" if parts.label else k: v for k, v in parts.settings.items()}

        first = self.dense_accuracy is not None
        return Parts(
            cards=self.cards + other.cards,
            sections=self.sections + other.sections,
            settings={**prefixed(self), **prefixed(other)},
            accuracy_rows=list(self.accuracy_rows) + _relabelled(other.accuracy_rows, self.accuracy_rows),
            dense_accuracy=self.dense_accuracy if first else other.dense_accuracy,
            reference_label=self.reference_label if first else other.reference_label,
            per_layer=self.per_layer or other.per_layer,
            files={**self.files, **other.files},
            accuracy_title=self.accuracy_title if self.accuracy_rows else other.accuracy_title,
            layer_title=self.layer_title if self.per_layer else other.layer_title,
        )


def _relabelled(rows: Sequence[Mapping[str, Any]], taken: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``rows`` with every series label that ``taken`` already uses renamed ``"label (2)"`` (``(3)``...):
    two runs with the same name stay two series, never one line jumping between them."""
    used = {series_label(row) for row in taken}
    renamed: dict[str, str] = {}
    for label in dict.fromkeys(series_label(row) for row in rows):
        new, n = label, 1
        while new in used:
            n += 1
            new = f"{label} ({n})"
        used.add(new)
        renamed[label] = new
    return [row if renamed[series_label(row)] == series_label(row) else {**row, "label": renamed[series_label(row)]}
            for row in rows]


def series_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The numbers behind an accuracy plot, one list item per line drawn (series and fine-tuning), with
    its colour, marker and line style as data attributes, so the plot can be read without the image."""
    styles = series_styles(rows)
    lines: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for row in rows:
        lines.setdefault((series_label(row), bool(row.get("finetuned"))), []).append(
            (float(row["sparsity"]), float(row["accuracy"])))
    items = []
    for (label, finetuned), points in lines.items():
        style = styles[label]
        shown = ", ".join(f"{100 * x:.3g}%: {percent(y)}" for x, y in sorted(points))
        items.append(f'<li data-series="{html.escape(label)}" data-color="{style["color"]}" '
                     f'data-marker="{html.escape(style["marker"])}" data-line="{"solid" if finetuned else "dashed"}">'
                     f'{html.escape(label)}, {"fine-tuned" if finetuned else "no fine-tuning"}: {html.escape(shown)}</li>')
    return f'<details class="series"><summary>the numbers behind the plot</summary><ul>{"".join(items)}</ul></details>'


ACCURACY_NOTE = ("Dashed, hollow markers: right after pruning; solid, filled: after fine-tuning. Dotted: {}. "
                 "Lines are drawn slightly apart sideways so that equal ones stay visible.")


def write_page(
    out_dir: str | os.PathLike,
    title: str,
    parts: Parts,
    subtitle: str | None = None,
    settings_heading: str = "Settings",
) -> dict[str, Path]:
    """Write ``report.html`` into ``out_dir`` (created if needed) with the PNGs of the shared plots, and
    return the paths written (the parts' files, ``accuracy_plot`` and ``layer_plot`` when drawn, ``report``).

    The page: the headline cards, accuracy against sparsity, sparsity per layer, each producer's
    sections in order, then the settings. ``ValueError`` when there is nothing to show.
    """
    out = Path(out_dir)
    sections: list[Section] = []
    files: dict[str, Path] = dict(parts.files)
    if parts.cards:
        sections.append(Section("Headline", headline_html(parts.cards)))
    if not (parts.cards or parts.sections or parts.accuracy_rows or parts.per_layer):
        raise ValueError("nothing to report: give results files, a model, or a sensitivity analysis")
    out.mkdir(parents=True, exist_ok=True)
    if parts.accuracy_rows:
        files["accuracy_plot"] = plot_accuracy_vs_sparsity(
            parts.accuracy_rows, out / "accuracy_vs_sparsity.png", parts.dense_accuracy, title=parts.accuracy_title,
            reference_label=parts.reference_label)
        sections.append(Section("Accuracy against sparsity", image_html(files["accuracy_plot"],
                                "accuracy against sparsity, one line per method") + series_html(parts.accuracy_rows),
                                note=ACCURACY_NOTE.format(parts.reference_label)))
    if parts.per_layer:
        files["layer_plot"] = plot_layer_sparsity(parts.per_layer, out / "layer_sparsity.png", title=parts.layer_title)
        sections.append(Section("Sparsity per layer", image_html(files["layer_plot"], "pruned fraction per layer")))
    sections += parts.sections
    if parts.settings:
        sections.append(Section(settings_heading, settings_html(parts.settings)))
    images = sum(section.body.count("<img ") for section in sections)
    subtitle = subtitle if subtitle is not None else f"{images} plot(s); every image is embedded in this file"
    files["report"] = write_html(out / "report.html", title, sections, subtitle=subtitle)
    return files


# --- the speed and size table ---------------------------------------------------------------------


def ratio(a: Any, b: Any) -> float | None:
    """``a / b``, or ``None`` when either is missing or ``b`` is zero."""
    return a / b if a is not None and b else None


def kib(value: Any) -> str:
    """``2048 -> "2.0 KiB"``; ``None -> "-"``."""
    return "-" if value is None else f"{value / 1024:,.1f} KiB"


def count(value: Any) -> str:
    """``21470 -> "21,470"``; ``None -> "-"``."""
    return "-" if value is None else f"{value:,}"


SPEED_SIZE_COLUMNS = [Column("quantity"), Column("dense", align="right"), Column("pruned", align="right"),
                      Column("gain", align="right")]


def speed_size_rows(measured: Mapping[str, Any]) -> list[dict[str, str]]:
    """The speed and size table from a dict of ``params_total``, ``params_nonzero``,
    ``size_dense_bytes``, ``size_sparse_bytes``, ``flops_dense``, ``flops_remaining``,
    ``latency_dense_s``, ``latency_sparse_s`` (``prunekit.report.measure_speed_size`` gives one):
    dense and pruned side by side, and the gain (dense / pruned)."""
    m = measured
    return [
        {"quantity": "parameters (non-zero)", "dense": count(m.get("params_total")),
         "pruned": count(m.get("params_nonzero")), "gain": times(ratio(m.get("params_total"), m.get("params_nonzero")))},
        {"quantity": "file size", "dense": kib(m.get("size_dense_bytes")), "pruned": kib(m.get("size_sparse_bytes")),
         "gain": times(ratio(m.get("size_dense_bytes"), m.get("size_sparse_bytes")))},
        {"quantity": "FLOPs per example", "dense": count(m.get("flops_dense")), "pruned": count(m.get("flops_remaining")),
         "gain": times(ratio(m.get("flops_dense"), m.get("flops_remaining")))},
        {"quantity": "latency", "dense": seconds(m.get("latency_dense_s")), "pruned": seconds(m.get("latency_sparse_s")),
         "gain": times(ratio(m.get("latency_dense_s"), m.get("latency_sparse_s")), 2)},
    ]


def speed_size_cards(measured: Mapping[str, Any]) -> list[Card]:
    """The two headline numbers of the speed and size table: file size and measured speedup."""
    return [Card("file size", times(ratio(measured.get("size_dense_bytes"), measured.get("size_sparse_bytes"))),
                 "smaller, sparse format"),
            Card("measured speedup", times(ratio(measured.get("latency_dense_s"), measured.get("latency_sparse_s")), 2),
                 "sparse kernels")]
