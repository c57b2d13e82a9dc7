#!/usr/bin/env python
"""The seed methods added by issue 13, each beside magnitude pruning, on digits (mean +- std over seeds).

Networks: LeNet-300-100 (and LeNet-5 for the FLOPs allocation) on scikit-learn's digits (1437 train /
360 test images, fixed split), Adam lr 1e-3, batch 64, one thread. The seed sets the initialisation and
the data order. Calibration data is the training set. Rows:

* one-shot, no fine-tuning: magnitude vs layer-wise OBS (``method="obs"``, 4 rounds), local and global, and
  on LeNet-5 (local);
* Han's rule ``|w| < q std`` (q = 1, ``scope="threshold"``) vs magnitude at the sparsity it reaches;
* channels (hidden neurons), 50% removed, no fine-tuning: L1 (magnitude), first- and second-order Taylor;
* dynamic network surgery (c = 2, 10 epochs from the trained network) vs magnitude at the same sparsity
  fine-tuned for the same 10 epochs;
* targeted dropout (gamma 0.75, alpha 0.5) vs plain training, both pruned to the targeted 75%;
* greedy per-layer allocation vs uniform and global magnitude at the same FLOPs budget (LeNet-5).

    .venv/bin/python benchmarks/seed_methods.py                # 3 seeds (~3 min on one core)
    .venv/bin/python benchmarks/seed_methods.py --quick --seeds 1 --no-save   # smoke run

Results go to ``benchmarks/results/seed_methods.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree, not whatever is installed

import prunekit as pk  # noqa: E402
from measuring import save_results  # noqa: E402
from prunekit.allocation import flops_cost, greedy_allocation, layer_flops  # noqa: E402
from prunekit.criteria.obs import OBS  # noqa: E402
from prunekit.data import digits, evaluate, loaders, train  # noqa: E402
from prunekit.models import LeNet5, LeNet300100  # noqa: E402
from prunekit.regularizers import DynamicNetworkSurgery, TargetedDropout  # noqa: E402
from prunekit.targets import resolve_targets  # noqa: E402


def _trained(kind: str, seed: int, epochs: int):
    train_set, test_set = digits(image=kind == "lenet5")
    train_loader, test_loader = loaders(train_set, test_set, seed=seed)
    torch.manual_seed(seed)
    model = LeNet5() if kind == "lenet5" else LeNet300100()
    train(model, train_loader, epochs=epochs)
    return model, train_loader, test_loader


def run_seed(seed: int, quick: bool) -> dict[str, tuple[float, float]]:
    """``{row: (accuracy, sparsity or FLOPs fraction)}`` for one seed."""
    epochs, post = (3, 2) if quick else (15, 10)
    out: dict[str, tuple[float, float]] = {}
    base, train_loader, test_loader = _trained("mlp", seed, epochs)
    acc = lambda m: evaluate(m, test_loader)  # noqa: E731
    out["dense LeNet-300-100"] = (acc(base), 0.0)

    for s in (0.7, 0.9):
        for scope in ("local", "global"):
            m = copy.deepcopy(base)
            pk.prune(m, s, method="magnitude", scope=scope)
            out[f"{s:.0%} {scope}: magnitude"] = (acc(m), pk.sparsity(m))
            m = copy.deepcopy(base)
            pk.prune(m, s, method=OBS(rounds=2 if quick else 4), scope=scope, data=train_loader)
            out[f"{s:.0%} {scope}: OBS"] = (acc(m), pk.sparsity(m))

    m = copy.deepcopy(base)
    pk.prune(m, method="han", scope="threshold")
    han = pk.sparsity(m)
    out["Han's rule, q=1"] = (acc(m), han)
    for scope in ("local", "global"):
        m = copy.deepcopy(base)
        pk.prune(m, han, method="magnitude", scope=scope)
        out[f"Han's sparsity: magnitude {scope}"] = (acc(m), pk.sparsity(m))

    x = next(iter(train_loader))[0]
    for method in ("l1", "taylor", "taylor_so"):
        m = copy.deepcopy(base)
        data = None if method == "l1" else train_loader
        pk.structured.prune(m, x, 0.5, method=method, data=data, max_batches=8)
        out[f"50% neurons: {method}"] = (acc(m), 0.5)

    m = copy.deepcopy(base)
    dns = DynamicNetworkSurgery(m, c=2.0)
    train(m, train_loader, epochs=post, callback=lambda _s: dns.step())
    dns.to_masks()
    out["DNS c=2"] = (acc(m), pk.sparsity(m))
    m2 = copy.deepcopy(base)
    pk.prune(m2, pk.sparsity(m), method="magnitude", scope="global")
    train(m2, train_loader, epochs=post)
    out["DNS's sparsity: magnitude global + fine-tune"] = (acc(m2), pk.sparsity(m2))

    for prepared in (False, True):
        train_set, test_set = digits()
        tl, _ = loaders(train_set, test_set, seed=seed)
        torch.manual_seed(seed)
        m = LeNet300100()
        td = TargetedDropout(m, targeted=0.75, rate=0.5) if prepared else None
        train(m, tl, epochs=epochs)
        if td is not None:
            td.remove()
        TargetedDropout(m, targeted=0.75).to_masks()  # the same pruning for both: 75% of every unit
        out["targeted dropout, pruned 75%" if prepared else "plain training, pruned 75%"] = (acc(m), pk.sparsity(m))

    cnn, cnn_train, cnn_test = _trained("lenet5", seed, epochs)
    targets = resolve_targets(cnn)
    cost = flops_cost(layer_flops(cnn, targets, next(iter(cnn_train))[0]))
    dense_cost = cost({})
    out["dense LeNet-5"] = (evaluate(cnn, cnn_test), 1.0)

    for s in (0.7, 0.9):  # OBS on a CNN: convolutions through their im2col inputs
        m = copy.deepcopy(cnn)
        pk.prune(m, s, method="magnitude", scope="local")
        out[f"LeNet-5 {s:.0%} local: magnitude"] = (evaluate(m, cnn_test), pk.sparsity(m))
        m = copy.deepcopy(cnn)
        pk.prune(m, s, method=OBS(rounds=2 if quick else 4), scope="local", data=cnn_train)
        out[f"LeNet-5 {s:.0%} local: OBS"] = (evaluate(m, cnn_test), pk.sparsity(m))

    def flops_of(model) -> float:
        return cost({t.name: 1 - float(t.value.ne(0).float().mean()) for t in resolve_targets(model)}) / dense_cost

    for budget in (0.2, 0.1):
        m = copy.deepcopy(cnn)
        pk.prune(m, 1 - budget, scope="local")
        out[f"FLOPs {budget:.0%}: uniform"] = (evaluate(m, cnn_test), flops_of(m))
        low, high = 0.0, 0.999  # the global sparsity whose FLOPs meet the budget
        for _ in range(25):
            mid = (low + high) / 2
            m = copy.deepcopy(cnn)
            pk.prune(m, mid, scope="global")
            low, high = (mid, high) if flops_of(m) > budget else (low, mid)
        m = copy.deepcopy(cnn)
        pk.prune(m, high, scope="global")
        out[f"FLOPs {budget:.0%}: global"] = (evaluate(m, cnn_test), flops_of(m))
        m = copy.deepcopy(cnn)
        pk.prune(m, scope=greedy_allocation(cnn, budget, cnn_train))
        out[f"FLOPs {budget:.0%}: greedy allocation"] = (evaluate(m, cnn_test), flops_of(m))
    return out


def _fmt(values: list[float], percent: bool = True) -> str:
    scale = 100 if percent else 1
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="few epochs: a smoke run, not results")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for seed in range(args.seeds):
        for name, value in run_seed(seed, args.quick).items():
            rows[name].append(value)
    lines = [
        "# Seed methods on digits (issue 13)",
        "",
        f"{args.seeds} seeds, mean ± std; {'quick smoke run' if args.quick else 'LeNet-300-100 / LeNet-5 trained 15 epochs'}; "
        "no fine-tuning unless the row says so. Last column: sparsity of the pruned weights, or the FLOPs kept "
        "(FLOPs rows).",
        "",
        "| setting | test accuracy % | sparsity / FLOPs kept % |",
        "|---|---|---|",
    ]
    for name, values in rows.items():
        lines.append(f"| {name} | {_fmt([a for a, _ in values])} | {_fmt([s for _, s in values])} |")
    lines += ["", f"Ran in {time.perf_counter() - start:.0f} s on {platform.machine()}, torch {torch.__version__}, 1 thread."]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_save:
        save_results(args.out, "seed_methods", table,
                     {"seeds": args.seeds, "quick": args.quick, "rows": {k: [list(v) for v in vs] for k, vs in rows.items()}})


if __name__ == "__main__":
    main()
