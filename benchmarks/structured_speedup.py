#!/usr/bin/env python
"""Structured pruning makes models faster: measured latency beside the theoretical speedup from FLOPs.

For each built-in model (VGG-11 and ResNet-20 by default, 32x32 inputs, batches 32 and 1), each
Hugging Face transformer (a BERT-base-sized ``BertForSequenceClassification``, 64 tokens, and a
ViT-small-sized ``ViTForImageClassification``, 224x224; random weights, batches 8 and 1; MLP width and
attention heads pruned) and each ratio of channels removed (25%, 50%, 75%:
``pk.structured.prune(model, x, ratio, method="l1", scope="local")``), in one process and one thread:

* **theoretical speedup** = dense FLOPs / pruned FLOPs (``prunekit.metrics.flops``: convolutions,
  linear layers and matrix products, 2 FLOPs per multiply-add);
* **measured speedup** = dense latency / pruned latency, each the median of ``--repeats`` forward
  passes in eval mode under ``torch.inference_mode()`` after warm-up. Dense and pruned models are
  timed in alternating rounds so that a change of machine load affects both alike;
* **efficiency** = measured / theoretical.

    .venv/bin/python benchmarks/structured_speedup.py                       # full run, ~2 minutes
    .venv/bin/python benchmarks/structured_speedup.py --models resnet20 --ratios 0.5 --batches 1 \
        --repeats 2 --out /tmp/x                                           # smoke run

``--round-to 8 auto`` adds rows for built-in models pruned with ``round_to`` (``auto``: the CPU's float32
vector width, ``pk.structured.vector_round_to()``), to measure whether whole vectors close the gap of
narrow convolutions.

Results go to ``benchmarks/results/structured_speedup.{md,json}``. The exit status is 1 when a pruned
model's output shape differs from the dense one's or it does not shrink.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree, not whatever is installed

import prunekit as pk
from prunekit.models import get_model
from measuring import save_results

TARGET_EFFICIENCY = 0.8  # measured / theoretical at batch 32 and 50%
TRANSFORMERS = ("bert-base", "vit-small")


def build(name: str, size: int, seq: int):
    """``(model, inputs(batch))`` of a built-in model or a random-weight transformer."""
    if name not in TRANSFORMERS:
        return get_model(name).eval(), lambda batch: torch.randn(batch, 3, size, size)
    import transformers as tf

    if name == "bert-base":  # bert-base-uncased's shapes
        config = tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                               num_labels=2)
        return tf.BertForSequenceClassification(config).eval(), lambda batch: {
            "input_ids": torch.randint(0, config.vocab_size, (batch, seq))}
    config = tf.ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12,  # ViT-S/16
                          num_attention_heads=6, intermediate_size=1536, num_labels=1000)
    return tf.ViTForImageClassification(config).eval(), lambda batch: {"pixel_values": torch.randn(batch, 3, 224, 224)}


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def output_shape(out) -> tuple:
    return tuple((out.logits if hasattr(out, "logits") else out).shape)


def median_latency(models: list, x, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Median wall-clock seconds and median CPU seconds (this thread's) per forward pass of each model,
    timed in alternating rounds. With one thread, CPU time excludes the time spent waiting while other
    processes hold the core."""
    wall = [[] for _ in models]
    cpu = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model.eval()
            for _ in range(warmup):
                call(model, x)
        for _ in range(repeats):
            for i, model in enumerate(models):
                start, start_cpu = time.perf_counter(), time.thread_time()
                call(model, x)
                cpu[i].append(time.thread_time() - start_cpu)
                wall[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]


def _layer_kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.Conv2d):
        k = module.kernel_size[0]
        return f"Conv2d {module.in_channels}->{module.out_channels} {k}x{k}"
    return type(module).__name__


def layer_breakdown(dense: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[dict]:
    """CPU time and FLOPs per kind of layer (convolutions by their dense widths), dense vs pruned: where
    the measured speedup falls short of the FLOP ratio."""
    leaves = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.MaxPool2d, torch.nn.AvgPool2d,
              torch.nn.AdaptiveAvgPool2d, torch.nn.Linear)

    def timed(model):
        times, start, handles = {}, {}, []
        for name, m in model.named_modules():
            if isinstance(m, leaves):
                handles.append(m.register_forward_pre_hook(
                    lambda mod, a, name=name: start.__setitem__(name, time.thread_time())))
                handles.append(m.register_forward_hook(
                    lambda mod, a, o, name=name: times.setdefault(name, []).append(time.thread_time() - start[name])))
        with torch.inference_mode():
            for _ in range(2):
                model(x)
            times.clear()
            for _ in range(repeats):
                model(x)
        for h in handles:
            h.remove()
        return {k: statistics.median(v) for k, v in times.items()}

    flops = {}
    for label, model in (("dense", dense), ("pruned", pruned)):
        rows = pk.metrics.summary(model, x[:1], print_table=False)
        flops[label] = {r["name"]: r["flops"] or 0 for r in rows}
    t_dense, t_pruned = timed(dense), timed(pruned)
    kinds: dict[str, dict] = {}
    for name, seconds in t_dense.items():
        kind = _layer_kind(dense.get_submodule(name))
        row = kinds.setdefault(kind, {"layer": kind, "count": 0, "dense_ms": 0.0, "pruned_ms": 0.0,
                                      "dense_flops": 0, "pruned_flops": 0})
        row["count"] += 1
        row["dense_ms"] += seconds * 1e3
        row["pruned_ms"] += t_pruned.get(name, 0.0) * 1e3
        row["dense_flops"] += flops["dense"].get(name, 0) * x.shape[0]
        row["pruned_flops"] += flops["pruned"].get(name, 0) * x.shape[0]
    return sorted(kinds.values(), key=lambda r: -r["dense_ms"])


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    failures = []
    breakdowns = {}
    for name in args.models:
        torch.manual_seed(0)
        hf = name in TRANSFORMERS
        dense, inputs = build(name, args.size, args.seq)
        example = inputs(1)
        variants = [(ratio, None) for ratio in args.ratios]
        if not hf:
            variants += [(ratio, r) for r in args.round_to for ratio in args.ratios]
        pruned_models = {}
        for ratio, round_to in variants:
            model = copy.deepcopy(dense)
            round_to = None if round_to is None else (round_to if round_to == "auto" else int(round_to))
            report = pk.structured.prune(model, example, ratio, method="l1", scope="local", round_to=round_to)
            pruned_models[(ratio, round_to)] = (model, report)
        dense_flops = pk.metrics.flops(dense, example)[0]
        repeats, warmup = (args.hf_repeats, 1) if hf else (args.repeats, args.warmup)
        for batch in (args.hf_batches if hf else args.batches):
            x = inputs(batch)
            with torch.inference_mode():
                reference_shape = output_shape(call(dense, x))
            keys = list(pruned_models)
            models = [dense] + [pruned_models[k][0] for k in keys]
            latencies, cpu_times = median_latency(models, x, repeats, warmup)
            if batch == 32 and (0.5, None) in pruned_models and not args.no_breakdown and not hf:
                breakdowns[name] = layer_breakdown(dense, pruned_models[(0.5, None)][0], x, max(3, args.repeats // 2))
            for (ratio, round_to), latency, cpu_time in zip(keys, latencies[1:], cpu_times[1:]):
                model, report = pruned_models[(ratio, round_to)]
                with torch.inference_mode():
                    shape = output_shape(call(model, x))
                if shape != reference_shape or report.params_after >= report.params_before:
                    failures.append(f"{name} ratio {ratio}: output {tuple(shape)} vs {tuple(reference_shape)}")
                flops = pk.metrics.flops(model, example)[0]
                theoretical = dense_flops / flops
                measured = latencies[0] / latency
                measured_cpu = cpu_times[0] / cpu_time
                rows.append({
                    "model": name, "batch": batch, "ratio": ratio,
                    "round_to": pk.structured.vector_round_to() if round_to == "auto" else round_to,
                    "channels_removed": round(report.channel_fraction, 4),
                    "params_dense": report.params_before, "params_pruned": report.params_after,
                    "flops_dense_per_image": dense_flops, "flops_pruned_per_image": flops,
                    "latency_dense_s": latencies[0], "latency_pruned_s": latency,
                    "cpu_dense_s": cpu_times[0], "cpu_pruned_s": cpu_time,
                    "theoretical_speedup": theoretical, "measured_speedup": measured,
                    "measured_cpu_speedup": measured_cpu,
                    "efficiency": measured / theoretical, "cpu_efficiency": measured_cpu / theoretical,
                })
                print(f"{name:9s} batch {batch:3d} ratio {ratio:.2f} round_to {round_to}: theoretical {theoretical:5.2f}x, wall "
                      f"{measured:5.2f}x ({latencies[0] * 1e3:7.2f} -> {latency * 1e3:7.2f} ms), cpu {measured_cpu:5.2f}x "
                      f"({cpu_times[0] * 1e3:7.2f} -> {cpu_time * 1e3:7.2f} ms), efficiency {measured / theoretical:.2f} "
                      f"/ {measured_cpu / theoretical:.2f}", flush=True)
    return {
        "rows": rows,
        "breakdown_batch32_ratio0.5": breakdowns,
        "failures": failures,
        "settings": {"models": args.models, "ratios": args.ratios, "batches": args.batches, "size": args.size,
                     "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
                     "method": "l1", "scope": "local", "round_to": args.round_to, "seq": args.seq,
                     "hf_batches": args.hf_batches, "hf_repeats": args.hf_repeats,
                     "vector_round_to": pk.structured.vector_round_to(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor() or platform.machine()},
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "<!-- benchmark:structured_speedup -->",
        "| model | batch | channels removed | round_to | params | FLOPs / input | theoretical | measured | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        eff = f"{r['efficiency']:.2f}"
        if r["batch"] == 32 and abs(r["ratio"] - 0.5) < 1e-9 and r.get("round_to") is None:
            eff = f"**{eff}**"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['channels_removed']:.0%} | {r.get('round_to') or '–'} | "
            f"{r['params_dense'] / 1e6:.2f}M → {r['params_pruned'] / 1e6:.2f}M | "
            f"{r['flops_dense_per_image'] / 1e6:.0f}M → {r['flops_pruned_per_image'] / 1e6:.0f}M | "
            f"{r['theoretical_speedup']:.2f}× | {r['measured_speedup']:.2f}× | {eff} |"
        )
    checks = [r for r in result["rows"]
              if r["batch"] == 32 and abs(r["ratio"] - 0.5) < 1e-9 and r.get("round_to") is None]
    if checks:
        verdict = ", ".join(f"{r['model']} {r['efficiency']:.2f}" for r in checks)
        ok = all(r["efficiency"] >= TARGET_EFFICIENCY for r in checks)
        lines.append("")
        lines.append(f"Efficiency (measured / theoretical) at batch 32 and 50%: {verdict} "
                     f"(target ≥ {TARGET_EFFICIENCY}: **{'met' if ok else 'not met'}**).")
    for model, kinds in result.get("breakdown_batch32_ratio0.5", {}).items():
        lines += ["", f"Where the time goes, {model}, batch 32, 50% of channels removed (CPU time per layer kind; "
                      "GFLOP/s = FLOPs / time):", "",
                  "| layers (dense widths) | n | dense ms | pruned ms | speedup | FLOP ratio | GFLOP/s dense → pruned |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for k in kinds:
            ratio = k["dense_flops"] / k["pruned_flops"] if k["pruned_flops"] else None
            rate = (f"{k['dense_flops'] / k['dense_ms'] / 1e6:.1f} → {k['pruned_flops'] / max(k['pruned_ms'], 1e-9) / 1e6:.1f}"
                    if k["dense_flops"] else "–")
            lines.append(f"| {k['layer']} | {k['count']} | {k['dense_ms']:.2f} | {k['pruned_ms']:.2f} | "
                         f"{k['dense_ms'] / max(k['pruned_ms'], 1e-9):.2f}× | "
                         f"{'–' if ratio is None else f'{ratio:.2f}×'} | {rate} |")
    lines.append("")
    lines.append(f"{s['size']}x{s['size']} inputs, `pk.structured.prune(..., method=\"l1\", scope=\"local\")`, "
                 f"{s['threads']} thread, median of {s['repeats']} forward passes after {s['warmup']} warm-up, dense "
                 f"and pruned timed in alternating rounds in one process; torch {result['environment']['torch']}, "
                 f"{result['environment']['processor']}.")
    if any(m in TRANSFORMERS for m in s["models"]):
        lines.append(f"Transformers: random weights, bert-base = BERT-base shapes ({s.get('seq')} tokens), vit-small = "
                     f"ViT-S/16 (224x224); MLP width and attention heads pruned, hidden width kept; median of "
                     f"{s.get('hf_repeats')} passes.")
    if s.get("round_to"):
        lines.append(f"round_to `auto` = {s.get('vector_round_to')} float32 lanes ({s.get('cpu_capability')}).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet20"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 1])
    parser.add_argument("--hf-batches", nargs="+", type=int, default=[8, 1], help="batches of the transformers")
    parser.add_argument("--hf-repeats", type=int, default=5, help="timed passes of the transformers")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (bert-base)")
    parser.add_argument("--round-to", nargs="*", default=[], help="extra rows with round_to (integers or 'auto')")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-layer timing at batch 32, 50%%")
    args = parser.parse_args(argv)
    result = run(args)
    table = markdown(result)
    print(table)
    if not args.no_save:
        save_results(args.out, "structured_speedup", table, result)
    for failure in result["failures"]:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
