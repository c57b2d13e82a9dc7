"""``prunekit llm MODEL_DIR``: prune a local Hugging Face model in one shot and save it for ``transformers``.

    prunekit llm MODEL_DIR --method wanda --sparsity 0.5 [--pattern 2:4] [--calib FILE ...] --out DIR

Loads the model and its tokenizer from the folder (never from the hub), draws calibration sequences
from ``--calib`` files (default: the built-in standard-library docstrings), measures the held-out
perplexity (causal LMs; for encoders, the cosine similarity of mean-pooled sentence embeddings to the
dense model), prunes block by block with a progress bar, measures again, and writes ``DIR`` with
``save_pretrained`` (safetensors; masks baked in), the tokenizer, ``prune_report.json`` and, with a
pattern, ``model.nm.safetensors`` (the compact N:M format) with its size against the dense file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``llm`` subcommand to the ``prunekit`` parser's subparsers."""
    p = sub.add_parser(
        "llm",
        help="one-shot SparseGPT / Wanda / magnitude pruning of a local Hugging Face model",
        description="Prune the Linear layers inside the blocks of a local Hugging Face model (no hub access) with "
        "SparseGPT, Wanda or magnitude, unstructured or N:M; report perplexity (or, for encoders, embedding "
        "similarity) before and after; save the result with save_pretrained.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="a local model folder (config.json, model.safetensors, tokenizer)")
    p.add_argument("--method", default="sparsegpt", help="sparsegpt, wanda or magnitude (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction pruned per layer (default 0.5)")
    p.add_argument("--pattern", default=None, metavar="N:M", help="N:M pattern, e.g. 2:4 or 4:8")
    p.add_argument("--calib", action="append", default=None, metavar="FILE",
                   help="calibration text file (repeatable; default: built-in standard-library docstrings)")
    p.add_argument("--samples", type=int, default=64, metavar="N", help="calibration sequences (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L",
                   help="tokens per calibration sequence and evaluation window (default: %(default)s, capped at "
                   "the model's maximum)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling (default: %(default)s)")
    p.add_argument("--eval", action="append", default=None, metavar="FILE",
                   help="held-out text file (repeatable; default: the built-in held-out split)")
    p.add_argument("--eval-tokens", type=int, default=16384, metavar="N",
                   help="held-out tokens for perplexity (default: %(default)s)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="layer name or glob to keep dense, e.g. '*.mlp.down_proj' (repeatable)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per forward pass")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: MODEL_DIR)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=run)
    return p


def _check_args(args: argparse.Namespace) -> None:
    from ..scope import check_sparsity
    from .methods import LLM_METHODS, parse_pattern

    LLM_METHODS.get(args.method)
    nm = parse_pattern(args.pattern)
    if args.sparsity is not None:
        check_sparsity(args.sparsity, "--sparsity")
        if nm is not None and abs(args.sparsity - nm.sparsity) > 1e-9:
            raise ValueError(f"--pattern {nm.name} fixes the sparsity at {nm.sparsity:g}; leave --sparsity out")
    for name in ("samples", "seq_len", "eval_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a Hugging Face model folder (no config.json)")
    for f in (args.calib or []) + (args.eval or []):
        if not Path(f).is_file():
            raise FileNotFoundError(f"text file not found: {f}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _evaluate(model, causal: bool, eval_data: Any, seq_len: int, batch_size: int, reference=None) -> dict:
    from .evaluation import embedding_similarity, mean_pooled_embeddings
    from .perplexity import perplexity

    if causal:
        return {"perplexity": perplexity(model, eval_data, seq_len=seq_len, batch_size=batch_size)}
    if reference is None:
        return {"embeddings": mean_pooled_embeddings(model, eval_data)}
    return {"embedding_cosine": embedding_similarity(model, reference, eval_data)}


def run(args: argparse.Namespace) -> int:
    """Run ``prunekit llm`` (arguments from :func:`add_parser`); returns the exit status."""
    _check_args(args)
    import torch
    from rich.console import Console

    from ..masking import sparsity as model_sparsity
    from ..report import Column, print_table, write_json
    from .api import prune, rich_progress
    from .calibration import builtin_sentences, builtin_text, read_sources, sample_windows, tokenize_text
    from .evaluation import encode
    from .hf import is_causal_lm, load_model, load_tokenizer, save_pretrained
    from .methods import parse_pattern
    from .nm_format import save_nm

    if args.threads:
        torch.set_num_threads(args.threads)
    console, err = Console(), Console(stderr=True)
    start = time.perf_counter()
    err.print(f"loading {args.model}")
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    causal = is_causal_lm(model.config)
    limit = _max_positions(model)
    seq_len = min(args.seq_len, limit) if limit else args.seq_len

    stream = tokenize_text(tokenizer, read_sources(args.calib, None, "text"))
    calibration = sample_windows(stream, args.samples, seq_len, args.seed)
    if causal:
        eval_text = read_sources(args.eval, None, "text") if args.eval else builtin_text("heldout")
        eval_data = tokenize_text(tokenizer, eval_text)[: args.eval_tokens]
    else:
        if args.eval:
            sentences = [s for s in read_sources(args.eval, None, "text").splitlines() if s.strip()]
        else:
            sentences = builtin_sentences("heldout", n=256)
        eval_data = encode(tokenizer, sentences, max_length=seq_len)

    before = _evaluate(model, causal, eval_data, seq_len, args.batch_size)
    callback, stop = (None, None)
    if not args.no_progress:
        callback, stop = rich_progress(args.method, console=err)
    try:
        report = prune(model, calibration, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                       exclude=args.exclude, batch_size=args.batch_size, progress=callback or False)
    finally:
        if stop is not None:
            stop()
    after = _evaluate(model, causal, eval_data, seq_len, args.batch_size, reference=before.get("embeddings"))
    achieved = float(model_sparsity(model))

    out = Path(args.out)
    nm = parse_pattern(args.pattern)
    nm_report = save_nm(model, out / "model.nm.safetensors", nm.name) if nm is not None else None
    if nm is None:  # an earlier run into this folder may have left one, of another model
        (out / "model.nm.safetensors").unlink(missing_ok=True)
    save_pretrained(model, out, tokenizer)
    dense_file = out / "model.safetensors"

    rows: list[dict] = []
    if causal:
        rows.append({"": "perplexity (held-out)", "dense": f"{before['perplexity']:.3f}",
                     "pruned": f"{after['perplexity']:.3f}"})
    else:
        rows.append({"": "embedding cosine to dense", "dense": "1.0000", "pruned": f"{after['embedding_cosine']:.4f}"})
    rows.append({"": "sparsity of pruned layers", "dense": "0%", "pruned": f"{achieved:.1%}"})
    rows.append({"": "pruning time", "dense": "-", "pruned": f"{sum(report.block_seconds):.1f} s"})
    if nm_report is not None and dense_file.is_file():
        mib = 2**20
        rows.append({"": f"{nm.name} layers: dense vs values + indices",
                     "dense": f"{nm_report.packed_dense_bytes / mib:.2f} MiB",
                     "pruned": f"{nm_report.packed_bytes / mib:.2f} MiB ({nm_report.packed_ratio:.2f}x smaller)"})
        rows.append({"": "whole model: model.safetensors vs model.nm.safetensors",
                     "dense": f"{dense_file.stat().st_size / mib:.2f} MiB", "pruned": f"{nm_report.file_bytes / mib:.2f} MiB"})
    print_table(rows, [Column(""), Column("dense", align="right"), Column("pruned", align="right")],
                title=f"{args.method} {nm.name if nm else f'{report.target_sparsity:.0%}'} on {Path(args.model).name}",
                console=console)
    results = {
        "model": str(args.model),
        "method": args.method,
        "pattern": nm.name if nm else None,
        "sparsity": report.target_sparsity,
        "achieved_sparsity": achieved,
        "calibration": {"samples": args.samples, "seq_len": seq_len, "seed": args.seed,
                        "source": args.calib or "builtin"},
        "before": {k: v for k, v in before.items() if k != "embeddings"},
        "after": after,
        "prune": report.to_dict(),
        "nm_format": nm_report.to_dict() if nm_report else None,
        "safetensors_bytes": dense_file.stat().st_size if dense_file.is_file() else None,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(out / "prune_report.json", results)
    console.print(f"wrote {out} (save_pretrained, safetensors) and {out / 'prune_report.json'}", soft_wrap=True)
    return 0
