#!/usr/bin/env python
"""Pruning a model bigger than memory: peak resident memory of ``pk.llm.prune_from_disk`` against model size.

A random-weight Llama (by default TinyLlama-1.1B's architecture: 22 blocks, width 2048, MLP 5632, 32 query /
4 key-value heads, vocabulary 32000; 1.1B parameters, 4.4 GB in float32) is written to a temporary folder
(``--dir``, default under ``/tmp``) in 1 GB safetensors shards, one tensor at a time
(:class:`prunekit.llm.shards.ShardWriter`), so that writing it needs no more memory than one tensor.
Then, for each method, a fresh child process warms the code up on a tiny Llama (imports, first-call
buffers), and measures around ``prune_from_disk`` (50%, ``--samples`` x ``--seq-len`` random token ids,
one thread):

* the peak extra resident memory of the call (``VmHWM`` after it minus ``VmRSS`` before it, the peak reset
  with ``/proc/self/clear_refs`` after ``malloc_trim``: ``measuring.peak_rss``), with glibc's allocator as
  it is (what a user sees);
* that, as a percentage of the model's size, beside the calibration activations (the hidden states
  ``samples x seq_len x width`` float32 held between blocks), one block's weights and SparseGPT's largest
  Hessian (``MLP x MLP`` float32);
* the wall time, and that the output reloads as the same architecture with 50% zeros in every pruned layer.

``--allocation owl sensitivity`` (default ``uniform``) measures each method once per allocation: OWL and
sensitivity add a dense scoring pass that reads every block from disk once more, one block at a time.

    nice -n 10 .venv/bin/python benchmarks/llm_streaming.py                        # full run, ~20-40 minutes
    .venv/bin/python benchmarks/llm_streaming.py --smoke --out /tmp/x               # smoke run, seconds
    .venv/bin/python benchmarks/llm_streaming.py --smoke --allocation uniform owl --out /tmp/x

Results go to ``benchmarks/results/llm_streaming.{md,json}`` (``--out`` elsewhere). The model folders are
deleted at the end (``--keep`` keeps them). Exit status 1 when a measurement fails.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree, not whatever is installed
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measuring import cpu_name, peak_rss, run_child, save_results, source_state  # noqa: E402

_MB = 1 << 20
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def write_random_llama(folder: Path, shape: dict, shard: str, seed: int = 0) -> int:
    """A random-weight Llama checkpoint written one tensor at a time (norms 1, matrices N(0, 0.02));
    returns its bytes."""
    import transformers as tf

    from prunekit.llm.shards import ShardWriter, TensorInfo, parse_size

    config = tf.LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(config)
    plan = [(name, TensorInfo(folder, "F32", tuple(t.shape))) for name, t in meta.state_dict().items()]
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, plan, parse_size(shard))
    generator = torch.Generator().manual_seed(seed)
    for name, info in plan:
        if len(info.shape) == 1:
            value = torch.ones(info.shape)
        else:
            value = torch.empty(info.shape).normal_(0.0, 0.02, generator=generator)
        writer.write(name, value)
        del value
    writer.close()
    config.save_pretrained(folder)
    return sum(info.nbytes for _, info in plan)


def _block_done(blocks: list, index: int, total: int, seconds: float) -> None:
    blocks.append(seconds)
    print(f"  block {index + 1}/{total}: {seconds:.1f} s", flush=True)


def measure(method: str, model_dir: str, warm_dir: str, out_dir: str, samples: int, seq_len: int, vocab: int,
            allocation: str = "uniform") -> dict:
    """In a child: warm up on the tiny model, then the peak extra memory and the time of one call."""
    torch.set_num_threads(1)
    import prunekit as pk

    calib = pk.llm.random_calibration(vocab, samples, seq_len, seed=0)
    warm = pk.llm.random_calibration(SMOKE["vocab_size"], 2, 16, seed=0)
    pk.llm.prune_from_disk(warm_dir, out_dir + "_warm", warm, method=method, allocation=allocation)
    shutil.rmtree(out_dir + "_warm")
    blocks = []
    start = time.perf_counter()
    with peak_rss() as memory:
        report = pk.llm.prune_from_disk(model_dir, out_dir, calib, method=method, sparsity=0.5, batch_size=8,
                                        max_shard_size="1GB", allocation=allocation,
                                        progress=lambda i, n, s: _block_done(blocks, i, n, s))
    wall = time.perf_counter() - start
    from prunekit.llm.shards import Checkpoint

    written = Checkpoint(out_dir)
    name = "model.layers.0.mlp.down_proj.weight"
    w = written.read([name])[name]
    return {"method": method, "allocation": allocation, "block_sparsity": report.block_sparsity,
            "wall_s": wall, "block_seconds": blocks, "sparsity": report.sparsity,
            "down_proj_zero_fraction": float((w == 0).float().mean()),
            "shards_written": len({t.file for t in written.tensors.values()}), **memory}


def markdown(result: dict) -> str:
    m = result["model"]
    lines = [
        "# Pruning a model bigger than memory: `pk.llm.prune_from_disk`",
        "",
        f"{m['description']}: {m['bytes'] / 1e9:.2f} GB of float32 weights in {m['shards']} safetensors shards; "
        f"one block {m['block_bytes'] / _MB:.0f} MiB ({m['block_bytes'] / m['bytes']:.1%} of the model), SparseGPT's "
        f"largest Hessian {m['hessian_bytes'] / _MB:.0f} MiB. Calibration: {result['samples']} x {result['seq_len']} "
        f"random token ids, whose hidden states take {result['activation_bytes'] / _MB:.0f} MiB. 50% unstructured, "
        f"one thread, {result['machine']['cpu']}; the model written to and read from `{result['dir_kind']}`.",
        "",
        "| method | allocation | peak extra memory | % of the model | less the activations, % of the model | wall time | zeros in block 0's down projection |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| `{r['method']}` | {r.get('allocation', '')} | failed | | | | |")
            continue
        peak = r["peak_extra_bytes"]
        lines.append(
            f"| `{r['method']}` | {r['allocation']} | {peak / _MB:.0f} MiB{'' if r['exact'] else ' (lower bound)'} | "
            f"{peak / m['bytes']:.1%} | "
            f"{(peak - result['activation_bytes']) / m['bytes']:.1%} | {r['wall_s'] / 60:.1f} min | "
            f"{r['down_proj_zero_fraction']:.1%} |")
    lines += [
        "",
        "*Peak extra memory*: the call's peak resident memory (`VmHWM`) minus the resident memory before it, "
        "in a fresh process warmed up on a tiny Llama (so imports and first-call buffers are not counted), "
        "with glibc's allocator as it is. The pruned model is written shard by shard into a temporary folder "
        "that replaces the output folder at the end; `from_pretrained` loads it.",
        "",
        f"Source: commit `{result['source']['commit']}`; Python {result['machine']['python']}, "
        f"torch {result['machine']['torch']}.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda"])
    p.add_argument("--allocation", nargs="+", default=["uniform"], choices=["uniform", "owl", "sensitivity"],
                   help="one run per method and allocation (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="blocks (default: 22, TinyLlama's)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dir", default=None, help="where the models are written (default: a new folder under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the model folders")
    p.add_argument("--smoke", action="store_true", help="a 6-block width-128 Llama: seconds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = dict(SMOKE if args.smoke else TINYLLAMA)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="prunekit_streaming_", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    try:
        shard = "1MB" if args.smoke else "1GB"
        size = write_random_llama(work / "model", shape, shard)  # rewritten: the same seed gives the same weights
        write_random_llama(work / "warm", dict(SMOKE, num_hidden_layers=2), "1GB")
        h, i, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
        head_dim = h // shape["num_attention_heads"]
        block = 4 * (2 * h * h + 2 * h * kv * head_dim + 3 * h * i + 2 * h)
        ctx = mp.get_context("fork")
        for method in args.methods:
            for allocation in args.allocation:
                print(f"{method}, {allocation}: pruning {size / 1e9:.2f} GB from disk ...", flush=True)
                out = work / f"out_{method}_{allocation}"
                r = run_child(ctx, measure, method, str(work / "model"), str(work / "warm"), str(out),
                              args.samples, args.seq_len, shape["vocab_size"], allocation)
                r.setdefault("method", method)
                r.setdefault("allocation", allocation)
                runs.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "block_seconds"}), flush=True)
                shutil.rmtree(out, ignore_errors=True)
        description = ("TinyLlama-1.1B's architecture with random weights" if not args.smoke
                       else "a 6-block width-128 Llama (smoke run)")
        if args.layers:
            description += f", {args.layers} blocks"
        result = {
            "model": {"description": description, "config": shape, "bytes": size, "block_bytes": block,
                      "hessian_bytes": 4 * i * i, "shards": len(list((work / "model").glob("*.safetensors")))},
            "samples": args.samples, "seq_len": args.seq_len, "activation_bytes": 4 * args.samples * args.seq_len * h,
            "dir_kind": "/tmp" if str(work).startswith("/tmp") else str(work),
            "runs": runs,
            "machine": {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__},
            "source": source_state(),
        }
        save_results(args.out, "llm_streaming", markdown(result), result)
        print(markdown(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
