"""`prunekit report` / pk.report.write_report: the HTML report, its plots, and a real headless browser."""

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import prunekit as pk
from prunekit import cli, report
from prunekit.sensitivity_analysis import SensitivityResult

RECIPE = {
    "name": "lenet5-report",
    "seed": 0,
    "threads": 1,
    "model": {"builtin": "lenet5"},
    "data": {"name": "digits", "batch_size": 64, "kwargs": {"image": True}},
    "train": {"epochs": 3, "lr": 0.003},
    "prune": {"method": "magnitude", "sparsity": 0.8},
    "finetune": {"epochs": 1},
    "output": {"dir": "out", "report": False},
}

BENCHMARK = {
    "settings": {"layer": "Linear(1024, 1024)", "threads": 1},
    "linear": [
        {"sparsity": 0.9, "batch": 1, "dense_s": 1e-4, "sparse_s": 2e-4, "speedup": 0.5, "ideal": 10.0,
         "sparsify": "dense"},
        {"sparsity": 0.99, "batch": 32, "dense_s": 1.5e-3, "sparse_s": 1e-4, "speedup": 15.0, "ideal": 100.0,
         "sparsify": "sparse"},
    ],
}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """A recipe run, then `prunekit report` on its results and its model, with every section."""
    folder = tmp_path_factory.mktemp("report")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE), encoding="utf-8")
    assert cli.main(["prune", str(recipe), "--out", str(folder / "run")]) == 0
    (folder / "bench.json").write_text(json.dumps(BENCHMARK), encoding="utf-8")
    argv = ["report", str(folder / "run" / "results.json"), str(folder / "bench.json"), "--recipe", str(recipe),
            "--weights", str(folder / "run" / "model.safetensors"), "--sensitivity", "--sweep",
            "--sparsities", "0.5", "0.9", "0.95", "--out", str(folder / "report"), "--no-progress"]
    assert cli.main(argv) == 0
    return folder / "report"


@pytest.mark.slow  # the module's recipe run and report take about 15-25 s
def test_report_has_every_plot_and_table(full_report):
    pngs = sorted(p.name for p in full_report.glob("*.png"))
    assert pngs == ["accuracy_vs_sparsity.png", "layer_sparsity.png", "sensitivity.png"]
    for name in pngs:
        width, height = png_size(full_report / name)
        assert width > 300 and height > 150
    html = (full_report / "report.html").read_text(encoding="utf-8")
    assert html.count('<img alt="') == 3 and html.count("data:image/png;base64,") == 3
    for heading in ("Accuracy against sparsity", "Sparsity per layer", "Sensitivity of each layer",
                    "Speed and size", "Sparse kernels: Linear(1024, 1024)", "Settings"):
        assert f"<h2>{heading}" in html, heading
    for quantity in ("parameters (non-zero)", "file size", "FLOPs per example", "latency"):
        assert f">{quantity}<" in html
    assert "15.00×" in html  # the benchmark's speedup, formatted
    assert "http" not in html.replace("http-equiv", "")  # self-contained: nothing to fetch


def test_report_from_python_objects(tmp_path):
    result = SensitivityResult([0.5, 0.9], {"a.weight": [0.9, 0.5], "b.weight": [0.95, 0.94]}, 0.95,
                               {"a.weight": 100, "b.weight": 1000}, metric="accuracy")
    rows = [{"label": "magnitude (global)", "sparsity": s, "accuracy": a, "finetuned": False}
            for s, a in [(0.5, 0.9), (0.9, 0.7)]]
    files = report.write_report(tmp_path, sensitivity=result, accuracy_rows=rows, dense_accuracy=0.95,
                                per_layer=result.allocate(sparsity=0.8), title="objects")
    assert set(files) == {"accuracy_plot", "layer_plot", "sensitivity_plot", "report"}
    html = files["report"].read_text(encoding="utf-8")
    assert "<title>objects</title>" in html and "a.weight" in html
    with pytest.raises(ValueError, match="nothing to report"):
        report.write_report(tmp_path / "empty")


def test_speed_and_size_of_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    pk.prune(model, 0.9, scope="local")
    measured = report.measure_speed_size(model, torch.randn(1, 256), sparse_kernels=False, repeats=3)
    assert measured["params_total"] == 256 * 256 + 256 + 256 * 10 + 10
    assert measured["size_sparse_bytes"] == pk.metrics.model_size(model, sparse=True) < measured["size_dense_bytes"]
    assert measured["latency_dense_s"] == measured["latency_sparse_s"] > 0
    rows = {r["quantity"]: r for r in report.speed_size_rows(measured)}
    assert rows["file size"]["gain"] == report.times(measured["size_dense_bytes"] / measured["size_sparse_bytes"])


def test_results_files_are_recognised_or_rejected(tmp_path):
    assert report.result_kind({"rows": [], "dense": {}}) == "demo"
    assert report.result_kind({"before": {}, "after": {}}) == "recipe"
    assert report.result_kind(BENCHMARK) == "sparse_inference"
    assert report.result_kind({"kind": "prunekit.sensitivity"}) == "sensitivity"
    # the kind field decides, whatever other keys the file has; files from before it existed still load
    assert report.result_kind({"kind": "prunekit.recipe", "rows": [], "dense": {}}) == "recipe"
    assert report.result_kind({"kind": "prunekit.demo"}) == "demo"
    assert report.result_kind({"kind": "prunekit.speed_size"}) == "speed_size"
    with pytest.raises(ValueError, match="unknown results kind 'prunekit.nothing'"):
        report.result_kind({"kind": "prunekit.nothing", "rows": [], "dense": {}})
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="bad.json: not a prunekit results file"):
        report.load_results(bad)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["report", "--out", str(tmp_path / "r")]) == 2
    assert "nothing to report" in capsys.readouterr().err
    assert cli.main(["report", "--sweep", "--out", str(tmp_path / "r")]) == 2
    assert "need --recipe" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


# --- the real browser --------------------------------------------------------------------------------


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--force-device-scale-factor=1", "--hide-scrollbars"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


PROBE = """<script>
window.addEventListener("load", () => {
  document.documentElement.setAttribute("data-height", String(document.documentElement.scrollHeight));
  document.querySelectorAll("img").forEach((img) => {
    const r = img.getBoundingClientRect();
    img.setAttribute("data-probe", [img.complete ? 1 : 0, img.naturalWidth, img.naturalHeight,
      Math.round(r.left), Math.round(r.top + window.scrollY), Math.round(r.width), Math.round(r.height)].join(","));
  });
});
</script>"""


@pytest.mark.slow
def test_headless_chromium_shows_every_plot(full_report, tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium not found (Debian: apt-get install chromium; .ci/run installs it)")
    page = full_report / "report.html"
    html = page.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    width = 1100

    # 1. the DOM after load: every image decoded at its PNG's own size, and laid out with a size
    dom = run_chromium(browser, tmp_path / "profile", f"--window-size={width},2000", "--virtual-time-budget=5000",
                       "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    probes = [tuple(map(int, p.split(","))) for p in re.findall(r'data-probe="([^"]+)"', dom.stdout)]
    sources = re.findall(r'<img alt="([^"]*)"', html)
    assert len(probes) == len(sources) == 3
    expected_sizes = sorted(png_size(p) for p in full_report.glob("*.png"))
    assert sorted((p[1], p[2]) for p in probes) == expected_sizes
    for complete, natural_w, natural_h, left, top, shown_w, shown_h in probes:
        assert complete == 1 and natural_w > 0 and natural_h > 0
        assert shown_w > 0 and shown_h > 0
    height = int(re.search(r'data-height="(\d+)"', dom.stdout).group(1))

    # 2. the screenshot: at each image's place, the plot's pixels (not the page's background)
    shot = tmp_path / "shot.png"
    taken = run_chromium(browser, tmp_path / "profile", f"--window-size={width},{height}", f"--screenshot={shot}",
                         page.as_uri())
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (height, width)
    blue = np.array([0x1F, 0x77, 0xB4])  # the first series' colour in every prunekit plot
    for _, _, _, left, top, shown_w, shown_h in probes:
        region = pixels[top : top + shown_h, left : left + shown_w]
        assert region.shape[0] == shown_h and region.shape[1] == shown_w  # fully inside the screenshot
        ink = (region.sum(axis=2) < 600).mean()  # axes, text, lines, bars
        colours = len(np.unique(region.reshape(-1, 3), axis=0))
        assert 0.01 < ink < 0.9 and colours > 20, (ink, colours)
        assert (np.abs(region - blue).max(axis=2) <= 12).sum() > 20  # the plotted data is drawn
    # and between the plots, the page: its light background, not a broken-image icon or a blank
    background = pixels[5:15, 5:15].reshape(-1, 3)
    assert (np.abs(background - np.array([0xF6, 0xF7, 0xF9])).max(axis=1) <= 2).all()
    Image.open(shot).save(full_report / "screenshot.png")  # kept next to the report for a human look


def test_report_help(capsys):
    assert cli.main(["report", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--recipe", "--weights", "--sensitivity", "--sweep", "--sparsities", "--out"):
        assert flag in out


@pytest.mark.slow  # uses the module's recipe run and report
def test_a_pruned_model_is_not_analysed_as_if_dense(full_report):
    # the README's own example: --weights of an 80% sparse model, with --sensitivity --sweep (grid 50/90/95%)
    html = (full_report / "report.html").read_text(encoding="utf-8")
    lines = re.findall(r'<li data-series="([^"]+)"[^>]*>[^:]*: ([^<]+)</li>', html)
    sweep = [(label, points) for label, points in lines if label.startswith("magnitude (")]
    assert sweep, lines
    for label, points in sweep:
        assert label.endswith(", from 80% sparse"), label
        xs = [float(point.split("%")[0]) for point in points.split(", ")]
        assert min(xs) >= 79.9, (label, xs)  # the 50% point is left out: pruning to 50% changes nothing
    assert "Dotted: the given model, 80.0% sparse" in html and "Dotted: dense" not in html
    assert "starts from an already pruned model" in html  # the sensitivity section says so too


NARROW_PROBE = """<script>
window.addEventListener("load", () => {
  const root = document.documentElement;
  const overflowing = [...document.querySelectorAll("section, .table, dl, .cards")]
    .filter((e) => e.getBoundingClientRect().right > root.clientWidth + 1).length;
  root.setAttribute("data-widths", [root.scrollWidth, root.clientWidth, overflowing].join(","));
});
</script>"""


@pytest.mark.slow  # a headless browser
def test_headless_chromium_reads_the_page_at_a_narrow_width(tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium not found (Debian: apt-get install chromium; .ci/run installs it)")
    demo = json.loads((Path(__file__).resolve().parent.parent / "benchmarks/results/demo.json").read_text())
    # the same results twice: two series of each label, which must stay two lines, not one that jumps
    files = report.write_report(tmp_path / "report", results=[demo, demo], title="twice")
    probe = tmp_path / "probe.html"
    probe.write_text(files["report"].read_text(encoding="utf-8").replace("</body>", NARROW_PROBE + "</body>"))
    dom = run_chromium(browser, tmp_path / "profile", "--window-size=360,2000", "--virtual-time-budget=5000",
                       "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    scroll, client, overflowing = map(int, re.search(r'data-widths="([^"]+)"', dom.stdout).group(1).split(","))
    assert scroll <= client and overflowing == 0  # no table or section wider than a phone's screen

    items = re.findall(r'<li data-series="([^"]+)" data-color="([^"]+)" data-marker="([^"]+)" data-line="(\w+)">'
                       r'[^:]*: ([^<]+)</li>', dom.stdout)
    labels = {label for label, *_ in items}
    assert {"magnitude (global)", "magnitude (global) (2)", "taylor (global)", "taylor (global) (2)"} <= labels
    styles = {label: (color, marker) for label, color, marker, _, _ in items}
    assert len(set(styles.values())) == len(styles)  # every series its own colour and marker
    for label, _, _, line, points in items:  # each line runs left to right: no x visited twice
        xs = [float(point.split("%")[0]) for point in points.split(", ")]
        assert xs == sorted(set(xs)), (label, line, xs)
