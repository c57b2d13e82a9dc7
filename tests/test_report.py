"""Tables, plots and the self-contained HTML page (prunekit.render, prunekit.plots)."""

import base64
import io
import re
import struct
import sys

import pytest
import torch
from rich.console import Console

from prunekit import plots, render

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; asserts the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_drawn_png(path) -> tuple[int, int]:
    """Asserts the PNG decodes to its header's size and is not blank; returns (width, height)."""
    import matplotlib.image

    width, height = png_size(path)
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width)
    assert image.std() > 0.05  # something is drawn on the white figure
    return width, height


ROWS = [
    {"method": "magnitude", "scope": "global", "sparsity": 0.5, "finetuned": False, "accuracy": 0.95},
    {"method": "magnitude", "scope": "global", "sparsity": 0.9, "finetuned": False, "accuracy": 0.70},
    {"method": "magnitude", "scope": "global", "sparsity": 0.5, "finetuned": True, "accuracy": 0.97},
    {"method": "magnitude", "scope": "global", "sparsity": 0.9, "finetuned": True, "accuracy": 0.93},
    {"method": "random", "scope": "global", "sparsity": 0.5, "finetuned": False, "accuracy": 0.40},
    {"method": "random", "scope": "global", "sparsity": 0.9, "finetuned": False, "accuracy": 0.10},
]


# --- formatting and tables --------------------------------------------------------------------------


def test_formatters():
    assert render.percent(0.9123) == "91.2%"
    assert render.percent(0.9, 0) == "90%"
    assert render.percent(None) == "-"
    assert render.times(9.32) == "9.3×"
    assert render.times(float("inf")) == "∞"
    assert render.seconds(0.000231) == "231 µs"
    assert render.seconds(0.0123) == "12.3 ms"
    assert render.seconds(2.5) == "2.5 s"


def test_column_alignment_follows_the_values():
    rows = [{"name": "a", "value": 1.5, "flag": True}, {"name": "b", "value": 2, "flag": False}]
    assert render.Column("value").alignment(rows) == "right"
    assert render.Column("name").alignment(rows) == "left"
    assert render.Column("flag").alignment(rows) == "left"  # booleans are not numbers
    assert render.Column("name", align="right").alignment(rows) == "right"
    assert render.Column("flag").cell(rows[0]) == "yes"
    assert render.Column("missing").cell(rows[0]) == "-"


def test_print_table_formats_and_right_aligns_numbers():
    out = io.StringIO()
    columns = [render.Column("method"), render.Column("accuracy", format=render.percent)]
    render.print_table(ROWS[:2], columns, title="results", console=Console(file=out, width=60))
    lines = out.getvalue().splitlines()
    text = "\n".join(lines)
    assert "results" in text and "method" in text and "accuracy" in text
    assert "95.0%" in text and "70.0%" in text
    row = next(line for line in lines if "95.0%" in line)
    header = next(line for line in lines if "accuracy" in line)
    # right-aligned: the value ends where the header ends
    assert row.rstrip().endswith("95.0%")
    assert header.rstrip().index("accuracy") + len("accuracy") == len(row.rstrip())


def test_print_table_never_crops_columns_in_a_file():
    out = io.StringIO()
    rows = [{"a": "x" * 50, "b": "y" * 50, "c": 1.0}]
    render.print_table(rows, ["a", "b", "c"], console=Console(file=out, width=80))
    text = out.getvalue()
    assert "x" * 50 in text and "y" * 50 in text
    assert re.search(r"y{50}\s+1\b", text)


# --- plots ------------------------------------------------------------------------------------------


def test_accuracy_plot_is_a_png(tmp_path):
    path = plots.plot_accuracy_vs_sparsity(ROWS, tmp_path / "acc.png", dense_accuracy=0.97)
    width, height = assert_drawn_png(path)
    assert width > 400 and height > 300


def test_accuracy_plot_accepts_zero_sparsity(tmp_path):
    rows = [dict(r, sparsity=0.0) for r in ROWS[:1]] + ROWS[1:2]
    path = plots.plot_accuracy_vs_sparsity(rows, tmp_path / "acc0.png")  # no logit axis with 0
    width, height = assert_drawn_png(path)
    assert width > 400 and height > 300


def test_layer_plot_grows_with_the_number_of_layers(tmp_path):
    small = plots.plot_layer_sparsity({"fc1.weight": 0.8, "fc2.weight": 0.95}, tmp_path / "a.png")
    many = {f"layer{i}.weight": i / 20 for i in range(12)}
    large = plots.plot_layer_sparsity(many, tmp_path / "b.png")
    assert assert_drawn_png(large)[1] > assert_drawn_png(small)[1]


def test_missing_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install "prunekit\[demo\]"'):
        plots.require_matplotlib()


# --- HTML -------------------------------------------------------------------------------------------


def test_table_html_escapes_aligns_and_highlights():
    rows = [{"name": "<b>fc1</b>", "value": 0.5}, {"name": "fc2", "value": 0.25}]
    html = render.table_html(rows, [render.Column("name"), render.Column("value", format=render.percent)],
                             highlight=lambda r: r["name"] == "fc2")
    assert "&lt;b&gt;fc1&lt;/b&gt;" in html and "<b>fc1" not in html
    assert '<td class="right">50.0%</td>' in html
    assert html.count('class="best"') == 1


def test_image_html_embeds_the_png(tmp_path):
    path = plots.plot_layer_sparsity({"fc1.weight": 0.5}, tmp_path / "l.png")
    tag = render.image_html(path, alt="bars")
    encoded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag).group(1)
    assert base64.b64decode(encoded) == path.read_bytes()


def test_write_html_is_self_contained(tmp_path):
    png = plots.plot_accuracy_vs_sparsity(ROWS, tmp_path / "acc.png", dense_accuracy=0.97)
    sections = [
        render.Section("Headline", render.headline_html([("dense", "97.0%", "baseline"), render.Card("best", "93.0%")])),
        render.Section("Plot", render.image_html(png), note="a note"),
        render.Section("Results", render.table_html(ROWS, ["method", "sparsity", "accuracy"])),
        render.Section("Settings", render.settings_html({"seed": 0, "methods": ["magnitude", "random"]})),
    ]
    path = render.write_html(tmp_path / "r.html", "Title <&>", sections, subtitle="sub")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<title>Title &lt;&amp;&gt;</title>" in text
    assert "<style>" in text and "data:image/png;base64," in text
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing external to fetch
    assert text.count("<section>") == 4 and "97.0%" in text and "a note" in text
    assert "[&quot;magnitude&quot;, &quot;random&quot;]" in text


# --- readable plots ----------------------------------------------------------------------------------


@pytest.fixture
def drawn(monkeypatch):
    """The real figures the plot functions drew (kept when they close them)."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    for fig in figures:
        close(fig)


def test_x_labels_never_overlap(tmp_path, drawn):
    # close sparsities on a linear axis (0% is there): 80% / 80.75%, and 90% / 95% / 98%
    rows = [dict(ROWS[0], sparsity=s) for s in (0.0, 0.5, 0.8, 0.8075, 0.9, 0.95, 0.98)]
    plots.plot_accuracy_vs_sparsity(rows, tmp_path / "acc.png")
    fig = drawn[-1]
    renderer = fig.canvas.get_renderer()
    boxes = sorted((t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()
                    if t.get_visible() and t.get_text()), key=lambda b: b.x0)
    assert len(boxes) >= 4  # 0%, 50%, 80%, and at least one of 90/95/98%
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 <= right.x0, "two x labels overlap"


def test_lines_with_the_same_values_stay_visible_and_distinct(tmp_path, drawn):
    same = [{"label": label, "sparsity": s, "accuracy": 0.9, "finetuned": True} for label in ("a", "b") for s in (0.5, 0.9)]
    plots.plot_accuracy_vs_sparsity(same, tmp_path / "acc.png")
    a, b = [line for line in drawn[-1].axes[0].get_lines() if len(line.get_xdata()) == 2]
    assert (a.get_color(), a.get_marker()) != (b.get_color(), b.get_marker())
    assert a.get_marker() != b.get_marker()  # distinct even in black and white
    on_screen_a = a.get_transform().transform(a.get_xydata())
    on_screen_b = b.get_transform().transform(b.get_xydata())
    assert abs(on_screen_a - on_screen_b)[:, 0].min() >= 2  # drawn apart sideways, not one over the other


def test_series_with_the_same_label_are_kept_apart():
    first = [{"label": "run", "sparsity": 0.5, "accuracy": 0.9, "finetuned": True}]
    second = [{"label": "run", "sparsity": 0.5, "accuracy": 0.4, "finetuned": True}]
    merged = render.Parts(accuracy_rows=first).merge(render.Parts(accuracy_rows=second))
    assert [plots.series_label(r) for r in merged.accuracy_rows] == ["run", "run (2)"]
    html = render.series_html(merged.accuracy_rows)
    assert html.count("<li ") == 2 and 'data-series="run (2)"' in html and "40.0%" in html


def test_outputs_are_written_atomically(tmp_path, monkeypatch):
    import os

    path = render.write_json(tmp_path / "r.json", {"a": 1})
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the write fails at its last step
    with pytest.raises(OSError, match="No space"):
        render.write_json(path, {"a": 2})
    with pytest.raises(OSError, match="No space"):
        plots.plot_layer_sparsity({"fc1.weight": 0.5}, tmp_path / "r.json")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.json"]
