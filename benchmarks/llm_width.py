#!/usr/bin/env python
"""Width pruning's scores and bias compensation compared on a real model: what each costs in quality.

The real all-MiniLM-L6-v2 (offline), pruned by ``pk.llm.prune_depth_width`` (MLP channels, attention heads,
a block) with magnitude, Wanda-structured and FLAP scores, each with and without FLAP's bias compensation;
quality is the embedding cosine similarity to the dense model on 256 held-out sentences, with 32 x 128
calibration tokens, one thread. Speed against quality for width and depth is ``llm_structured.py``'s.

    nice -n 10 .venv/bin/python benchmarks/llm_width.py   # about 3 minutes

Results go to ``benchmarks/results/llm_width.{md,json}`` (``--no-save``: printed only).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import prunekit as pk  # noqa: E402
from measuring import save_results  # noqa: E402  (atomic .md and .json)

RESULTS = Path(__file__).resolve().parent / "results"

QUALITY_VARIANTS = [  # label, prune_depth_width keyword arguments (method and compensation added below)
    ("MLP -25%", dict(mlp=0.25)),
    ("MLP -50%", dict(mlp=0.5)),
    ("heads -25%", dict(mlp=0.0, heads=0.25)),
    ("MLP -25% + heads -25%", dict(mlp=0.25, heads=0.25)),
    ("1 of 6 blocks + MLP -25%", dict(layers=1, mlp=0.25)),
]
METHODS = [("magnitude", False), ("wanda", False), ("wanda", True), ("flap", False), ("flap", True)]


def quality() -> list[dict]:
    from prunekit.llm.evaluation import encode
    from prunekit.llm.models import load_minilm

    dense, tokenizer = load_minilm()
    calib = pk.llm.calibration_data(tokenizer, num_samples=32, seq_len=128, seed=0)
    inputs = encode(tokenizer, pk.llm.builtin_sentences("heldout", n=256))
    reference = pk.llm.mean_pooled_embeddings(dense, inputs)
    rows = []
    for label, kw in QUALITY_VARIANTS:
        row = {"variant": label}
        for method, compensate in METHODS:
            model = copy.deepcopy(dense)
            report = pk.llm.prune_depth_width(model, calib, method=method, compensate=compensate, **kw)
            key = method + (" + compensation" if compensate else "")
            row[key] = pk.llm.embedding_similarity(model, reference, inputs)
            row["params"] = report.params_after
            row[key + " seconds"] = report.seconds
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = quality()
    keys = [m + (" + compensation" if c else "") for m, c in METHODS]
    lines = ["all-MiniLM-L6-v2 (22.7M parameters): embedding cosine similarity to the dense model, 256 held-out "
             "sentences, 32 x 128 calibration tokens, `scope=\"uniform\"`, one thread.", "",
             "| variant | parameters | " + " | ".join(f"`{k}`" for k in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for r in rows:
        best = max(r[k] for k in keys)
        cells = [f"**{r[k]:.3f}**" if r[k] == best else f"{r[k]:.3f}" for k in keys]
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        save_results(RESULTS, "llm_width", text, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
