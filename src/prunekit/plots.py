"""PNG plots of pruning results (matplotlib on the Agg backend, imported only when a plot is made).

A leaf: it draws the numbers it is given and imports nothing from prunekit but :mod:`prunekit.fileio`
(every PNG is written atomically: a reader never sees a half-written file).

* :func:`plot_accuracy_vs_sparsity`: accuracy against sparsity, one colour per series.
* :func:`plot_layer_sparsity`: the pruned fraction of each layer, as horizontal bars.
* :func:`plot_curves`: any metric against sparsity, one line per named curve (sensitivity analyses).
* :func:`plot_tradeoff`: labelled points of speed against quality, one panel per model.

``pip install "prunekit[demo]"`` provides matplotlib; :func:`require_matplotlib` says so when it is missing.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .fileio import atomic_write

__all__ = ["require_matplotlib", "plot_accuracy_vs_sparsity", "plot_layer_sparsity", "plot_curves", "plot_tradeoff", "series_label",
           "series_styles", "COLORS", "MARKERS"]

#: the series colours of every prunekit plot, in order (the first, blue, is what the browser test looks for)
COLORS = ["#1f77b4", "#d62728", "#7f7f7f", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


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


def _legend_outside_and_save(fig, ax, handles, path: str | os.PathLike) -> None:
    """The line plots' shared finish: light grid, legend to the right of the axes, PNG written."""
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, path)


def _save(fig, path: str | os.PathLike) -> None:
    """Lay out and write ``fig`` as a PNG, atomically (x tick labels that would overlap are dropped)."""
    fig.tight_layout()
    fig.canvas.draw()
    for ax in fig.axes:
        _thin_x_labels(fig, ax)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())


def _sparsity_axis(ax, xs: Sequence[float], label: str) -> None:
    """A sparsity x axis: a logit scale when every value is in (0, 1) (it spreads out 90%, 95%, 98%),
    a tick at each value (labels rounded to 3 significant digits, one tick per label)."""
    logit = len(xs) > 1 and all(0.0 < x < 1.0 for x in xs)
    if logit:
        ax.set_xscale("logit")
        ax.minorticks_off()
    ticks: dict[str, float] = {}  # one tick per label: 94.99% and 95% reached by two runs are one "95%"
    for x in xs:
        ticks.setdefault(f"{100 * x:.3g}%", x)
    ax.set_xticks(list(ticks.values()), list(ticks))
    ax.set_xlabel(label + (" (logit scale)" if logit else ""))


def _thin_x_labels(fig, ax) -> None:
    """Hide every x tick label that would overlap the last one kept (left to right): close sparsities
    (80% and 80.7%, or 95% and 98% on a linear axis) never print over each other."""
    renderer = fig.canvas.get_renderer()
    right = -math.inf
    for label in sorted(ax.get_xticklabels(), key=lambda t: t.get_window_extent(renderer).x0):
        if not label.get_text():
            continue
        box = label.get_window_extent(renderer)
        if box.x0 < right + 3:  # 3 pixels of air between labels
            label.set_visible(False)
        else:
            right = box.x1


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def series_label(row: Mapping[str, Any]) -> str:
    """The series a row of :func:`plot_accuracy_vs_sparsity` belongs to: its ``label``, else
    ``"method (scope)"``."""
    return row.get("label") or f"{row['method']} ({row['scope']})"


def series_styles(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Per series label, in order of appearance: its ``color`` and ``marker``, each series a different
    pair (so lines with the same values stay distinguishable)."""
    labels = list(dict.fromkeys(series_label(row) for row in rows))
    return {label: {"color": COLORS[i % len(COLORS)], "marker": MARKERS[(i + i // len(COLORS)) % len(MARKERS)]}
            for i, label in enumerate(labels)}


def plot_accuracy_vs_sparsity(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    dense_accuracy: float | None = None,
    title: str = "Accuracy vs sparsity",
    reference_label: str = "dense",
) -> Path:
    """Accuracy against sparsity: one colour and one marker per series (:func:`series_styles`), a solid
    line with filled markers for fine-tuned rows and a dashed one with hollow markers for the others,
    and ``dense_accuracy`` as a dotted horizontal line (legend: ``reference_label``).

    Series are drawn a few points apart sideways, so lines with the same values do not hide each other.
    Rows need ``sparsity``, ``accuracy``, ``finetuned`` and either ``label`` or ``method``/``scope``.
    """
    plt = require_matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.transforms import offset_copy

    styles = series_styles(rows)
    series: dict[str, dict[bool, list[tuple[float, float]]]] = {label: {} for label in styles}
    for row in rows:
        series[series_label(row)].setdefault(bool(row.get("finetuned")), []).append(
            (float(row["sparsity"]), float(row["accuracy"]))
        )
    xs_all = sorted({x for by_ft in series.values() for pts in by_ft.values() for x, _ in pts})
    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    try:
        handles = []
        for i, (label, by_ft) in enumerate(series.items()):
            style = styles[label]
            for finetuned, points in sorted(by_ft.items()):
                lane = 2 * i + (not finetuned) - (len(series) - 0.5)  # every line its own sideways lane
                shift = offset_copy(ax.transData, fig=fig, x=1.5 * lane, units="points")
                xs, ys = zip(*sorted(points))
                ax.plot(xs, [100 * y for y in ys], color=style["color"], linestyle="-" if finetuned else "--",
                        linewidth=2, marker=style["marker"], markersize=6, markerfacecolor=style["color"] if finetuned else "white",
                        transform=shift)
            handles.append(Line2D([], [], color=style["color"], marker=style["marker"], linewidth=2.5, label=label))
        # the shifted lines do not count for autoscaling: the data's own extent does
        ax.update_datalim([(x, 100 * y) for by_ft in series.values() for pts in by_ft.values() for x, y in pts])
        ax.autoscale_view()
        handles += [
            Line2D([], [], color="black", linestyle="-", marker="o", label="fine-tuned"),
            Line2D([], [], color="black", linestyle="--", marker="o", markerfacecolor="white", label="no fine-tuning"),
        ]
        if dense_accuracy is not None:
            ax.axhline(100 * dense_accuracy, color="black", linewidth=1, linestyle=":")
            handles.append(Line2D([], [], color="black", linestyle=":",
                                  label=f"{reference_label} ({100 * dense_accuracy:.1f}%)"))
        _sparsity_axis(ax, xs_all, "sparsity (fraction of weights pruned)")
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
        bars = ax.barh(range(len(names)), values, color=COLORS[0])
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
        _save(fig, path)
    finally:
        plt.close(fig)
    return Path(path)


def plot_curves(
    xs: Sequence[float] | Mapping[str, Sequence[float]],
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    baseline: float | None = None,
    baseline_label: str = "unpruned",
    xlabel: str = "sparsity",
    ylabel: str = "",
    title: str = "",
    scale: float = 1.0,
) -> Path:
    """One line per named curve over the sparsities ``xs`` (one list for all, or one per curve name),
    values times ``scale``, the ``baseline`` dotted; the legend names each curve as given."""
    plt = require_matplotlib()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    try:
        handles = []
        per_curve = xs if isinstance(xs, Mapping) else {name: xs for name in curves}
        for i, (name, values) in enumerate(curves.items()):
            color = COLORS[i % len(COLORS)]
            style = "-" if i < len(COLORS) else "--"
            ax.plot(per_curve[name], [scale * v for v in values], color=color, linestyle=style, marker="o",
                    markersize=4)
            handles.append(Line2D([], [], color=color, linestyle=style, linewidth=2, label=name))
        if baseline is not None:
            ax.axhline(scale * baseline, color="black", linewidth=1, linestyle=":")
            handles.append(Line2D([], [], color="black", linestyle=":", label=baseline_label))
        _sparsity_axis(ax, sorted({x for values in per_curve.values() for x in values}), xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        _legend_outside_and_save(fig, ax, handles, path)
    finally:
        plt.close(fig)
    return Path(path)


def plot_tradeoff(panels: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Side-by-side scatter panels of labelled points (e.g. tokens/s against quality).

    Each panel is ``{"title", "xlabel", "ylabel", "points": [{"label", "x", "y"}, ...]}`` (``"invert_y": True``
    turns the y axis upside down, e.g. so that a lower error sits higher); a point's label is written next to
    it, and points sharing a label share a colour across panels.
    """
    plt = require_matplotlib()
    labels = list(dict.fromkeys(p["label"] for panel in panels for p in panel["points"]))
    color = {label: COLORS[i % len(COLORS)] for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), dpi=110, squeeze=False)
    try:
        for ax, panel in zip(axes[0], panels):
            for point in panel["points"]:
                ax.scatter([point["x"]], [point["y"]], color=color[point["label"]], s=40, zorder=3)
                ax.annotate(point["label"], (point["x"], point["y"]), textcoords="offset points", xytext=(5, 4),
                            fontsize=7)
            ax.set_xlabel(panel.get("xlabel", ""))
            ax.set_ylabel(panel.get("ylabel", ""))
            ax.set_title(panel.get("title", ""), fontsize=10)
            ax.margins(0.18)
            if panel.get("invert_y"):
                ax.invert_yaxis()
            ax.grid(True, alpha=0.3)
        if title:
            fig.suptitle(title, fontsize=11)
        _save(fig, path)
    finally:
        plt.close(fig)
    return Path(path)
