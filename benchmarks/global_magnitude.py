#!/usr/bin/env python
"""Global magnitude pruning: ``prunekit.prune(scope="global")`` vs ``torch.nn.utils.prune.global_unstructured``.

For each method and sparsity, a fresh child process builds the same model (an MLP of mixed-size Linear
layers, about ``--params`` weights), makes the call once, and reports

* the wall time of the pruning call alone (median and best over ``--repeats`` children),
* the peak extra resident memory during the call: the process's peak RSS (``VmHWM``) after the call
  minus its RSS just before it. The peak is reset to the current RSS right before the call by writing
  ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0); where that is refused, the number is a lower bound
  and is flagged as such,
  Freed heap memory is handed back to the OS (``malloc_trim``) before the first reading, so that the
  call cannot hide its allocations in pages that earlier temporaries left resident,
* the memory still held after the call (masks, recomputed weights, ...), also after ``malloc_trim``.

Both methods must keep exactly the same weights: the first repeat of each writes its masks to a
temporary file and the parent compares them bit for bit. The weights are built so that every magnitude
is distinct (distinct float32 bit patterns, randomly signed), because with ~1e8 Gaussian float32 weights
exact ties at the threshold are common, and the two libraries break ties differently (both correctly).

    .venv/bin/python benchmarks/global_magnitude.py                 # full run, ~100M weights
    .venv/bin/python benchmarks/global_magnitude.py --params 5e6 --repeats 1 --out /tmp/x   # smoke

Results go to ``benchmarks/results/global_magnitude.{md,json}`` (``--out`` elsewhere, ``--no-save`` not
at all). Exit status 1 when the masks differ or a child fails.
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree, not whatever is installed

import prunekit as pk  # noqa: E402
from measuring import cpu_name, peak_rss, rss, run_child, save_results, source_state, trim  # noqa: E402

METHODS = {
    "torch": "torch.nn.utils.prune.global_unstructured(L1Unstructured)",
    "prunekit": 'prunekit.prune(method="magnitude", scope="global")',
}
_CHUNK = 1 << 22
_MB = 1 << 20


# --- the model ----------------------------------------------------------------------------------


def layer_shapes(params: float) -> tuple[int, list[tuple[int, int]]]:
    """(width d, [(out, in), ...]) of the MLP: stem d/2->d, 20 x d->d, 2 x (d->2d, 2d->d), head d->d/4.

    That is 28.75 d^2 weights; d is a multiple of 8 chosen so the total is close to ``params``.
    """
    d = max(8, int(round(math.sqrt(params / 28.75) / 8)) * 8)
    shapes = [(d, d // 2)] + [(d, d)] * 20 + [(2 * d, d), (d, 2 * d)] * 2 + [(d // 4, d)]
    return d, shapes


def build_model(params: float, seed: int = 0) -> tuple[nn.Sequential, list[nn.Linear]]:
    """The MLP with every weight magnitude distinct, every page touched."""
    _, shapes = layer_shapes(params)
    layers: list[nn.Module] = []
    linears: list[nn.Linear] = []
    for i, (out_f, in_f) in enumerate(shapes):
        lin = nn.utils.skip_init(nn.Linear, in_f, out_f)
        linears.append(lin)
        layers.append(lin)
        if i < len(shapes) - 1:
            layers.append(nn.ReLU())
    fill_distinct([lin.weight for lin in linears], seed)
    with torch.no_grad():
        for lin in linears:
            lin.bias.zero_()
    return nn.Sequential(*layers), linears


def fill_distinct(weights: list[torch.Tensor], seed: int) -> None:
    """Fill ``weights`` in place with float32 values of pairwise distinct magnitude.

    Entry ``p`` (counting over all weights) gets the bit pattern ``bits(2**-14) + (a p + c) mod n`` with
    ``a`` coprime to ``n``, so the ``n`` magnitudes are ``n`` consecutive float32 values spread evenly
    over the layers (about 12 binades between 6e-5 and 0.25 for n = 1e8), and a random sign.
    """
    n = sum(w.numel() for w in weights)
    base = (127 - 14) << 23
    if base + n >= 0x7F800000:
        raise ValueError(f"{n} weights do not fit the distinct-magnitude construction")
    a = int(n * 0.6180339887) | 1
    while math.gcd(a, n) != 1:
        a += 2
    g = torch.Generator().manual_seed(seed)
    c = int(torch.randint(0, n, (1,), generator=g))
    pos = 0
    with torch.no_grad():
        for w in weights:
            bits = w.view(-1).view(torch.int32)
            for start in range(0, bits.numel(), _CHUNK):
                stop = min(start + _CHUNK, bits.numel())
                idx = torch.arange(pos + start, pos + stop, dtype=torch.int64)
                value = ((idx * a + c) % n + base).to(torch.int32)
                sign = torch.randint(0, 2, (stop - start,), generator=g, dtype=torch.int32) << 31
                bits[start:stop] = value | sign
            pos += bits.numel()


# --- measuring one call in a child process ---------------------------------------------------------


def _prune(method: str, model: nn.Module, linears: list[nn.Linear], sparsity: float) -> None:
    if method == "prunekit":
        pk.prune(model, sparsity, method="magnitude", scope="global")
    elif method == "torch":
        torch_prune.global_unstructured(
            [(lin, "weight") for lin in linears], pruning_method=torch_prune.L1Unstructured, amount=sparsity
        )
    else:
        raise ValueError(method)


def _keep_masks(method: str, model: nn.Module, linears: list[nn.Linear]) -> list[torch.Tensor]:
    if method == "prunekit":
        found = pk.masks(model)
        names = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        return [found[name] for name in names]
    return [lin.weight_mask.to(torch.bool) for lin in linears]


def measure(
    method: str, params: float, sparsity: float, threads: int, mask_path: str | None, warmup: bool = True
) -> dict:
    """Build the model, prune it once, and report time and memory (runs inside the child).

    With ``warmup``, the same call first prunes a tiny model, so that lazy initialisation and the pages
    of library code that the call touches (file-backed, counted in RSS) are not charged to the call."""
    torch.set_num_threads(threads)
    if warmup:
        tiny, tiny_linears = build_model(2e4, seed=1)
        _prune(method, tiny, tiny_linears, sparsity)
        del tiny, tiny_linears
    model, linears = build_model(params)
    numel = sum(lin.weight.numel() for lin in linears)
    gc.collect()
    with peak_rss() as memory:
        t0 = time.perf_counter()
        _prune(method, model, linears, sparsity)
        wall = time.perf_counter() - t0
    gc.collect()
    trim()
    settled = rss()
    keep = _keep_masks(method, model, linears)
    kept = sum(int(m.sum()) for m in keep)
    if mask_path:
        np.save(mask_path, np.concatenate([np.packbits(m.reshape(-1).numpy()) for m in keep]))
    return {
        "method": method,
        "sparsity": sparsity,
        "wall_s": wall,
        "peak_extra_bytes": memory["peak_extra_bytes"],
        "peak_exact": memory["exact"],
        "retained_bytes": settled["VmRSS"] - memory["rss_before_bytes"],
        "rss_before_bytes": memory["rss_before_bytes"],
        "numel": numel,
        "kept": kept,
    }


# --- the benchmark --------------------------------------------------------------------------------


def _fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "n/a"


def summarize(runs: list[dict], weight_bytes: int) -> dict:
    walls = [r["wall_s"] for r in runs]
    peaks = [r["peak_extra_bytes"] for r in runs]
    return {
        "wall_s_median": statistics.median(walls),
        "wall_s_best": min(walls),
        "wall_s_all": walls,
        "peak_extra_mb_median": statistics.median(peaks) / _MB,
        "peak_extra_mb_all": [p / _MB for p in peaks],
        "peak_extra_over_weights": statistics.median(peaks) / weight_bytes,
        "peak_exact": all(r["peak_exact"] for r in runs),
        "retained_mb_median": statistics.median(r["retained_bytes"] for r in runs) / _MB,
        "kept": runs[0]["kept"],
    }


def markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    lines = [
        "# Global magnitude pruning: prunekit vs torch.nn.utils.prune",
        "",
        f"Model: MLP of {cfg['layers']} Linear layers (width {cfg['width']}, mixed shapes), "
        f"{cfg['numel'] / 1e6:.1f}M weights = {cfg['weight_mb']:.0f} MB of float32; "
        f"{cfg['repeats']} fresh process(es) per method and sparsity, {cfg['threads']} thread(s), "
        f"torch {env['torch']}, {env['cpu']} ({env['cpus']} CPUs), {env['date']}, prunekit at "
        f"{env['prunekit_commit']}" + (" with local changes in " + ", ".join(env["prunekit_modified"])
                                      if env["prunekit_modified"] else "") + ".",
        "",
        "Wall time: the pruning call alone, median (best) over the processes. Peak extra memory: peak RSS "
        "during the call minus RSS just before it"
        + ("" if result["peak_exact"] else " (LOWER BOUND: the kernel refused to reset the peak)")
        + "; x weights: that over the pruned weights' size. Retained: RSS still added after the call.",
        "",
        "| sparsity | method | wall time s | peak extra memory MB | extra memory / weights | retained MB |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for s in result["sparsities"]:
        rows = result["summary"][str(s)]
        for m in METHODS:
            r = rows[m]
            lines.append(
                f"| {s:g} | `{METHODS[m]}` | {r['wall_s_median']:.2f} ({r['wall_s_best']:.2f}) "
                f"| {r['peak_extra_mb_median']:.0f} | {r['peak_extra_over_weights']:.2f}x "
                f"| {r['retained_mb_median']:.0f} |"
            )
        t, p = rows["torch"], rows["prunekit"]
        lines.append(
            f"| {s:g} | **ratio torch / prunekit** | **{_fmt_ratio(t['wall_s_median'], p['wall_s_median'])}** "
            f"| **{_fmt_ratio(t['peak_extra_mb_median'], p['peak_extra_mb_median'])}** | | "
            f"{_fmt_ratio(t['retained_mb_median'], p['retained_mb_median'])} |"
        )
    lines += ["", "Masks identical (bit for bit) in every configuration: "
              + ("**yes**" if result["masks_equal"] else "**NO** (" + "; ".join(result["mask_problems"]) + ")")]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=100e6, help="target number of weights (default 1e8)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.5], help="sparsities (default 0.9 0.5)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per method and sparsity (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process (default 1)")
    p.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                   help="fork (default): children start from this process, which has imported torch but "
                   "allocated nothing; spawn: fresh interpreters (slower start, same numbers)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="directory for global_magnitude.md/.json (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not run the call on a tiny model first (then first-call costs count too)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    for s in args.sparsity:
        if not 0.0 < s < 1.0:
            raise SystemExit(f"--sparsity must be in (0, 1), got {s}")
    ctx = mp.get_context(args.start_method)
    source = source_state()  # children fork from this process: they run the code imported above
    width, shapes = layer_shapes(args.params)
    numel = sum(o * i for o, i in shapes)
    weight_bytes = numel * 4
    print(f"model: {len(shapes)} Linear layers, width {width}, {numel / 1e6:.1f}M weights "
          f"({weight_bytes / _MB:.0f} MB); sparsities {args.sparsity}, {args.repeats} repeat(s), "
          f"{args.threads} thread(s)", flush=True)

    runs: dict[str, dict[str, list[dict]]] = {str(s): {m: [] for m in METHODS} for s in args.sparsity}
    problems: list[str] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="pk-bench-") as tmp:
        for s in args.sparsity:
            for rep in range(args.repeats):
                order = list(METHODS) if rep % 2 == 0 else list(reversed(METHODS))  # alternate who goes first
                for m in order:
                    mask_path = os.path.join(tmp, f"{m}-{s}.npy") if rep == 0 else None
                    r = run_child(ctx, measure, m, args.params, s, args.threads, mask_path, not args.no_warmup)
                    if "error" in r:
                        print(f"sparsity {s} {m}: FAILED\n{r['error']}", file=sys.stderr, flush=True)
                        failed = True
                        continue
                    runs[str(s)][m].append(r)
                    print(f"sparsity {s:g} run {rep + 1} {m:>8}: {r['wall_s']:7.3f} s, peak extra "
                          f"{r['peak_extra_bytes'] / _MB:8.1f} MB, retained {r['retained_bytes'] / _MB:7.1f} MB",
                          flush=True)
            # the parent compares with numpy only: no torch work here, so later forks stay clean
            paths = [os.path.join(tmp, f"{m}-{s}.npy") for m in METHODS]
            if all(os.path.exists(p) for p in paths):
                a, b = (np.load(p) for p in paths)
                diff = int(np.unpackbits(a ^ b).sum()) if a.shape == b.shape else -1
                if diff:
                    problems.append(f"sparsity {s:g}: {diff} entries differ")
            else:
                problems.append(f"sparsity {s:g}: masks missing")
            expected_kept = numel - min(numel, int(round(s * numel)))
            for m in METHODS:
                if runs[str(s)][m] and runs[str(s)][m][0]["kept"] != expected_kept:
                    problems.append(f"sparsity {s:g}: {m} kept {runs[str(s)][m][0]['kept']}, expected {expected_kept}")
    if failed:
        raise SystemExit(1)

    summary = {s: {m: summarize(rs, weight_bytes) for m, rs in by_m.items()} for s, by_m in runs.items()}
    result = {
        "benchmark": "global_magnitude",
        "config": {
            "params_target": args.params,
            "numel": numel,
            "weight_mb": weight_bytes / _MB,
            "width": width,
            "layers": len(shapes),
            "shapes": shapes,
            "repeats": args.repeats,
            "threads": args.threads,
            "start_method": args.start_method,
            "warmup": not args.no_warmup,
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
            "prunekit_commit": source["commit"],
            "prunekit_modified": source["modified"],
        },
        "methods": METHODS,
        "sparsities": args.sparsity,
        "summary": summary,
        "runs": runs,
        "masks_equal": not problems,
        "mask_problems": problems,
        "peak_exact": all(v["peak_exact"] for by_m in summary.values() for v in by_m.values()),
    }
    table = markdown(result)
    print()
    print(table)
    if not args.no_save:
        md, js = save_results(args.out, "global_magnitude", table, result)
        print(f"wrote {md} and {js}")
    if problems:
        print("MASKS DIFFER: " + "; ".join(problems), file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
