"""``prunekit llm MODEL_DIR --low-memory``: the command's streaming branch, for models bigger than memory.

The model is never loaded whole: :func:`prunekit.llm.prune_from_disk` streams its blocks from the
safetensors shards and writes the pruned shards to ``--out``. Only the tokenizer is loaded, to draw the
calibration sequences exactly as the in-memory branch does (same windows, same seed). What needs the
whole model is refused (structured removal, distillation, other formats) or skipped (perplexity before and
after). OWL and sensitivity allocation stream: their dense scoring pass reads the blocks from disk once more.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

from ..outputs import check_output_folder
from ..render import Column, print_table
from .api import rich_progress
from .calibration import read_sources, sample_windows, tokenize_text
from .hf import load_tokenizer
from .methods import parse_pattern
from .shards import Checkpoint
from .streaming import REPORT_FILE, prune_from_disk

__all__ = ["run_low_memory", "check_low_memory"]

#: options that need the whole model in memory: (argument name, its flag, the value meaning "not used")
_WHOLE_MODEL = (("blocks", "--blocks", None), ("heads", "--heads", None), ("mlp", "--mlp", None),
                ("nm_out", "--nm-out", None), ("format", "--format", "hf"))


def check_low_memory(args: argparse.Namespace) -> None:
    """Refuse (``ValueError``) the options the streaming branch cannot honour, before any work."""
    for name, flag, unused in _WHOLE_MODEL:
        value = getattr(args, name, unused)
        if value != unused:
            raise ValueError(f"{flag} {value} needs the whole model in memory; --low-memory (or a model bigger than "
                             "half the available memory) streams one block at a time")
    if getattr(args, "recovery", None) == "distill":
        raise ValueError("--recovery distill needs the dense and the pruned model in memory; --low-memory streams "
                         "one block at a time (--recovery lsq works)")
    inputs = [args.model, args.tokenizer, *(args.calib or []), *(args.eval or [])]
    check_output_folder(args.out, "--out", keep=[p for p in inputs if p])


def _max_positions(model_dir: str) -> int | None:
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def run_low_memory(args: argparse.Namespace) -> int:
    """Run ``prunekit llm`` block by block from disk (``_check_args`` already passed); returns the exit status."""
    check_low_memory(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    console, err = Console(), Console(stderr=True)
    start = time.perf_counter()
    size = Checkpoint(args.model).nbytes
    err.print(f"low memory: streaming the blocks of {args.model} ({size / 2**30:.2f} GiB of weights) from disk")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    limit = _max_positions(args.model)
    seq_len = min(args.seq_len, limit) if limit else args.seq_len
    stream = tokenize_text(tokenizer, read_sources(args.calib, None, "text"))
    calibration = sample_windows(stream, args.samples, seq_len, args.seed)
    options = {}
    for name in ("allocation_range", "outlier_threshold"):  # checked with --allocation by _check_args
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    if getattr(args, "recovery", None) == "lsq":
        options["recovery"] = "lsq"
        if getattr(args, "recovery_steps", None) is not None:
            options["recovery_steps"] = args.recovery_steps
    callback, stop = (None, None)
    if not args.no_progress:
        callback, stop = rich_progress(args.method, console=err)
    settings = {"calibration": {"samples": args.samples, "seq_len": seq_len, "seed": args.seed,
                                "source": args.calib or "builtin"},
                "allocation": getattr(args, "allocation", "uniform")}
    try:
        report = prune_from_disk(args.model, args.out, calibration, method=args.method, sparsity=args.sparsity,
                                 pattern=args.pattern, exclude=args.exclude, batch_size=args.batch_size,
                                 progress=callback or False, metadata=settings,
                                 allocation=getattr(args, "allocation", "uniform"),
                                 sequential="layer" if getattr(args, "sequential", False) else "block", **options)
    finally:
        if stop is not None:
            stop()
    nm = parse_pattern(args.pattern)
    rows = [{"": "sparsity of pruned layers", "pruned": f"{report.sparsity:.1%}"},
            {"": "pruning time", "pruned": f"{sum(report.block_seconds):.1f} s"},
            {"": "perplexity", "pruned": "not measured (--low-memory never holds the whole model)"}]
    print_table(rows, [Column(""), Column("pruned", align="right")],
                title=f"{args.method} {nm.name if nm else f'{report.target_sparsity:.0%}'} on {Path(args.model).name}, "
                f"low memory, {time.perf_counter() - start:.0f} s", console=console)
    console.print(f"wrote {args.out} (safetensors shards for from_pretrained) and {Path(args.out) / REPORT_FILE}",
                  soft_wrap=True)
    return 0
