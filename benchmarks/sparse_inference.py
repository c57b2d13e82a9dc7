#!/usr/bin/env python
"""Sparse-kernel inference on the CPU: how much faster is a pruned layer with ``torch.sparse``?

For each sparsity (50, 70, 80, 90, 95, 99% by default) and batch size (1 and 32), a layer is pruned with
global magnitude pruning (unstructured, its weights Gaussian), and the dense layer (masks baked in, zeros
stored) is timed against :class:`prunekit.export.SparseLinear` (CSR with int32 indices; the matrix-vector
kernel at batch 1), interleaved, best of ``--repeats`` samples of about 2 ms each (medians in the JSON), with
``--threads`` torch threads (default 1). The table gives dense time, sparse time, their ratio (the
speedup), the ideal speedup ``1 / (1 - sparsity)`` (the FLOP ratio), and what ``prunekit.export.sparsify``
does with such a layer: it converts only layers measured at least ``min_speedup`` (1.1x) faster, so its
result is never slower than dense. Every sparse output is checked against the dense one.

The main table is a ``--size`` x ``--size`` Linear layer (default 1024, 4 MB of float32 weights); a
second table does the same for a 3x3 convolution (64 -> 64 channels on 16x16 inputs) computed as unfold
+ sparse matrix product.

    .venv/bin/python benchmarks/sparse_inference.py                  # full run, about a minute
    .venv/bin/python benchmarks/sparse_inference.py --quick --out /tmp/x   # smoke run, a few seconds

Results go to ``benchmarks/results/sparse_inference.{md,json}`` (``--out`` elsewhere, ``--no-save`` not
at all). Exit status 1 when a sparse output differs from the dense one.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree, not whatever is installed

import prunekit as pk  # noqa: E402
from prunekit import export  # noqa: E402
from prunekit._format import format_seconds  # noqa: E402
from measuring import cpu_name, save_results, source_state  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
BATCHES = (1, 32)
MIN_SPEEDUP = 1.1  # sparsify's default


def measure(layer: nn.Module, make_input, sparsity: float, batches, repeats: int, seed: int) -> list[dict]:
    """Prune ``layer`` to ``sparsity``, then time dense against sparse for each batch size."""
    torch.manual_seed(seed)
    pk.prune(layer, sparsity, method="magnitude")
    pk.finalize(layer)
    layer.eval()
    sparse = export.SparseLinear.from_dense(layer) if isinstance(layer, nn.Linear) else export.SparseConv2d.from_dense(layer)
    rows = []
    for batch in batches:
        x = make_input(batch)
        with torch.inference_mode():
            expected, got = layer(x), sparse(x)
            ok = bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(expected.abs().max()))))
            dense_med, sparse_med = export.time_pair(lambda: layer(x), lambda: sparse(x), repeats=repeats, warmup=3,
                                                     stat="median")
            dense_s, sparse_s = export.time_pair(lambda: layer(x), lambda: sparse(x), repeats=repeats, warmup=1,
                                                 stat="min")
        speedup = dense_s / sparse_s
        rows.append({
            "sparsity": sparsity,
            "batch": batch,
            "dense_s": dense_s,
            "sparse_s": sparse_s,
            "speedup": speedup,
            "dense_median_s": dense_med,
            "sparse_median_s": sparse_med,
            "speedup_median": dense_med / sparse_med,
            "ideal": 1.0 / (1.0 - sparsity),
            "sparsify": "sparse" if speedup >= MIN_SPEEDUP else "dense",  # its rule, on these numbers
            "outputs_match": ok,
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| sparsity | batch | dense | sparse (CSR) | speedup | ideal 1/(1-s) | `sparsify` picks |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        dense, sparse = format_seconds(r["dense_s"]), format_seconds(r["sparse_s"])
        lines.append(f"| {r['sparsity']:.0%} | {r['batch']} | {dense} | {sparse} | "
                     f"**{r['speedup']:.2f}x** | {r['ideal']:.0f}x | {r['sparsify']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="Linear layer size (default 1024)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--repeats", type=int, default=25, help="timing samples per kernel (default 25)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-conv", action="store_true", help="skip the convolution table")
    parser.add_argument("--quick", action="store_true", help="smoke run: size 256, 90%% and 99%%, 5 repeats")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.sparsity, args.repeats = 256, [0.9, 0.99], 5
    torch.set_num_threads(args.threads)

    linear_rows, conv_rows = [], []
    for i, s in enumerate(args.sparsity):
        linear_rows += measure(nn.Linear(args.size, args.size), lambda b: torch.randn(b, args.size), s,
                               args.batch, args.repeats, seed=i)
        if not args.no_conv:
            conv_rows += measure(nn.Conv2d(64, 64, 3, padding=1), lambda b: torch.randn(b, 64, 16, 16), s,
                                 args.batch, max(5, args.repeats // 3), seed=i)
        print(f"sparsity {s:.0%}: " + ", ".join(f"batch {r['batch']} {r['speedup']:.2f}x" for r in linear_rows[-len(args.batch):]),
              flush=True)

    settings = {
        "layer": f"Linear({args.size}, {args.size})",
        "conv": None if args.no_conv else "Conv2d(64, 64, 3, padding=1) on 16x16",
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "date": datetime.date.today().isoformat(),
        "prunekit_commit": source_state()["commit"],
    }
    md = [
        "# Sparse inference on the CPU: dense vs `torch.sparse` (prunekit.export)",
        "",
        f"{settings['layer']} pruned with global magnitude pruning; {args.threads} thread(s), torch "
        f"{settings['torch']}, {settings['cpu']}, {settings['date']}, prunekit at {settings['prunekit_commit']}. "
        "Best (minimum) time per forward call over interleaved samples of about 2 ms each (the medians, "
        "noisier on a shared machine, are in the JSON); speedup = dense / sparse; ideal = 1 / (1 - "
        f"sparsity), the FLOP ratio. `sparsify` measures the same way and converts a layer only when it is at least "
        f"{MIN_SPEEDUP}x faster (the last column applies that rule to these numbers), so what it returns is never "
        "slower than dense.",
        "",
        table(linear_rows),
    ]
    if conv_rows:
        md += ["", f"{settings['conv']}, as unfold (im2col) + sparse matrix product:", "", table(conv_rows)]
    ok = all(r["outputs_match"] for r in linear_rows + conv_rows)
    md += ["", f"Sparse outputs equal to dense (float32 tolerance) everywhere: **{'yes' if ok else 'NO'}**", ""]
    text = "\n".join(md)
    print(text)
    if not args.no_save:
        data = {"kind": "prunekit.sparse_inference", "settings": settings, "linear": linear_rows, "conv": conv_rows,
                "outputs_match": ok}
        save_results(args.out, "sparse_inference", text, data)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
