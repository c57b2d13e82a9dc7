"""``prunekit llm MODEL_DIR``: prune a local Hugging Face model and save it as one model ``transformers`` loads.

    prunekit llm MODEL_DIR [--method sparsegpt] [--sparsity 0.5 | --pattern 2:4] [--blocks N] [--heads F] [--mlp F]
                 [--allocation owl] [--sequential] [--recovery lsq] [--calib FILE ...] --out DIR

Loads the model and its tokenizer from the folder (never from the hub); draws calibration sequences from
``--calib`` files (default: the built-in standard-library docstrings); measures the held-out perplexity
(causal LMs; for encoders, the cosine similarity of mean-pooled sentence embeddings to the dense model);
removes whole blocks (``--blocks``), attention heads (``--heads``) and MLP channels (``--mlp``), then
prunes the Linear layers block by block (``--sparsity``/``--pattern``; ``--sparsity 0`` skips that step);
optionally distils from the dense model (``--recovery distill``); measures again; and
replaces ``DIR`` as a whole with exactly: what ``save_pretrained`` writes (config, safetensors weights with
the masks baked in as zeros) + the tokenizer + ``prune_report.json``, which records everything needed to
reproduce both perplexities (text sources with SHA-256, token counts, window, batch, seeds, versions).
The compact N:M file is written only on request (``--nm-out FILE``, outside the model folder).
``--format compressed-tensors`` writes the model folder in llm-compressor's sparse layout instead
(``prunekit.llm.save_compressed``: ``sparse-24-bitmask`` for 2:4, else ``sparse-bitmask``).

Every argument is checked, and the output folder too, before the model is loaded: a bad combination is
one ``error:`` line and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from rich.console import Console

from .._version import __version__
from ..masking import sparsity as model_sparsity
from ..outputs import RunOutput
from ..render import Column, print_table, write_json
from ..scope import check_sparsity
from .allocation import ALLOCATIONS
from .api import prune, rich_progress
from .blocks import find_blocks
from .calibration import builtin_sentences, builtin_text, read_sources, sample_windows, tokenize_text
from .cli_low_memory import run_low_memory
from .ct_format import plan_compressed, write_compressed
from .distillation import distill
from .evaluation import embedding_similarity, encode, mean_pooled_embeddings
from .heads import HEAD_IMPORTANCE, attention_layers, prune_heads
from .hf import is_causal_lm, load_model, load_tokenizer, save_pretrained
from .layers import prune_layers
from .methods import LLM_METHODS, parse_pattern
from .nm_format import save_nm
from .perplexity import negative_log_likelihood
from .streaming import needs_low_memory
from .width import SCOPES as WIDTH_SCOPES
from .width import WIDTH_METHODS, prune_width

__all__ = ["add_parser", "run"]

#: the defaults, chosen to fit a laptop CPU (see the README's measurement): 32 x 256 calibration tokens,
#: evaluation one window at a time (the logits of a batch of windows over a 50k vocabulary were the old peak)
#: on 8192 held-out tokens (the evaluation of dense and pruned model was most of the time once calibration shrank)
DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_EVAL_BATCH, DEFAULT_EVAL_TOKENS = 32, 256, 1, 8192
RECOVERY_CHOICES = ("lsq", "distill")
#: steps of each recovery when --recovery-steps is not given (lsq: conjugate-gradient steps; distill: AdamW steps)
RECOVERY_STEPS = {"lsq": 10, "distill": 100}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``llm`` subcommand to the ``prunekit`` parser's subparsers."""
    p = sub.add_parser(
        "llm",
        help="one-shot pruning of a local Hugging Face model: SparseGPT / Wanda / magnitude, N:M, blocks, heads, MLP width",
        description="Prune a local Hugging Face model (no hub access): remove whole blocks, attention heads and MLP "
        "channels, "
        "then prune the Linear layers inside the blocks with SparseGPT, Wanda or magnitude, unstructured or N:M; "
        "report perplexity (or, for encoders, embedding similarity) before and after; write one model that "
        "transformers loads, plus prune_report.json.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="a local model folder (config.json, model.safetensors, tokenizer)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder, replaced as a whole (a new or empty folder, or an earlier prunekit output)")
    g = p.add_argument_group("unstructured / N:M pruning of the blocks' Linear layers")
    g.add_argument("--method", default="sparsegpt", help="sparsegpt, wanda or magnitude (default: %(default)s)")
    g.add_argument("--sparsity", type=float, default=None,
                   help="fraction pruned per layer (default 0.5; 0 skips this step, for structured pruning only)")
    g.add_argument("--pattern", default=None, metavar="N:M", help="N:M pattern, e.g. 2:4 or 4:8")
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="layer name or glob to keep dense, e.g. '*.mlp.down_proj' (repeatable)")
    g.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                   help="sparsity per block: uniform, owl (outlier-weighted, Yin et al. 2024) or sensitivity "
                   "(default: %(default)s)")
    g.add_argument("--allocation-range", "--owl-lambda", type=float, default=None, metavar="LAMBDA",
                   help="owl/sensitivity: block sparsities span sparsity +- LAMBDA (default 0.08)")
    g.add_argument("--outlier-threshold", "--owl-m", type=float, default=None, metavar="M",
                   help="owl: a score is an outlier above M times its block's mean (default 5)")
    g.add_argument("--sequential", action="store_true",
                   help="true sequential: each layer's statistics come from the already-pruned layers before it "
                   "in its block (q/k/v, o, gate/up, down)")
    g.add_argument("--recovery", default=None, choices=RECOVERY_CHOICES,
                   help="lsq: layer-wise least squares on the calibration inputs as each layer is pruned; distill: "
                   "after all pruning, train the pruned model to match the dense one's logits on the calibration "
                   "data (holds both models in memory); masks are kept either way")
    g.add_argument("--recovery-steps", type=int, default=None, metavar="N",
                   help="lsq: conjugate-gradient steps (default 10); distill: AdamW steps (default 100)")
    g.add_argument("--distill-lr", type=float, default=None, metavar="LR", help="distill: peak learning rate (default 1e-4)")
    g.add_argument("--hidden-weight", type=float, default=None, metavar="W",
                   help="distill: weight of the hidden-state loss added to the logit KL (default 0)")
    g.add_argument("--nm-out", default=None, metavar="FILE",
                   help="with --pattern, also write the compact N:M file (values + 2-bit indices, "
                   "prunekit.llm.load_nm) here; it must lie outside --out")
    g.add_argument("--format", default="hf", choices=("hf", "compressed-tensors"),
                   help="hf: save_pretrained (dense safetensors, masks as zeros); compressed-tensors: "
                   "llm-compressor's sparse layout, sparse-24-bitmask for 2:4 else sparse-bitmask, read back with "
                   "prunekit.llm.load_compressed (default: %(default)s)")
    s = p.add_argument_group("structured pruning (physical removal, before the step above)")
    s.add_argument("--blocks", type=int, default=None, metavar="N",
                   help="remove N consecutive blocks (angular distance, Gromov et al. 2024)")
    s.add_argument("--heads", type=float, default=None, metavar="FRACTION",
                   help="remove this fraction of the attention heads (whole key/value groups under GQA)")
    s.add_argument("--heads-scope", default="uniform", choices=("uniform", "global"),
                   help="uniform: the same count in every block (plain transformers can load it when the new "
                   "count divides the width); global: ranked across blocks (reload with prunekit.llm.load_model) "
                   "(default: %(default)s)")
    s.add_argument("--head-importance", default=None, choices=HEAD_IMPORTANCE,
                   help="head scores: gradient (Michel et al. 2019; default for causal LMs) or magnitude "
                   "(default for encoders, which have no language-modelling loss)")
    s.add_argument("--mlp", "--width", type=float, default=None, metavar="FRACTION",
                   help="remove this fraction of every block's MLP channels (prunekit.llm.prune_width)")
    s.add_argument("--width-method", default=None, choices=WIDTH_METHODS,
                   help="MLP channel scores: flap (fluctuation, with bias compensation; An et al. 2024), wanda "
                   "(structured Wanda) or magnitude (default: flap)")
    s.add_argument("--width-scope", default=None, choices=WIDTH_SCOPES,
                   help="uniform: the same width in every block (plain transformers loads it); global: FLAP's "
                   "adaptive widths (reload with prunekit.llm.load_model) (default: uniform)")
    d = p.add_argument_group("data and evaluation")
    d.add_argument("--calib", action="append", default=None, metavar="FILE",
                   help="calibration text file (repeatable; default: built-in standard-library docstrings)")
    d.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                   help="calibration sequences (default: %(default)s)")
    d.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, metavar="L",
                   help="tokens per calibration sequence and evaluation window (default: %(default)s, capped at "
                   "the model's maximum)")
    d.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling (default: %(default)s)")
    d.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="calibration sequences per forward pass (default: %(default)s)")
    d.add_argument("--eval", action="append", default=None, metavar="FILE",
                   help="held-out text file (repeatable; default: the built-in held-out split)")
    d.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, metavar="N",
                   help="held-out tokens for perplexity (default: %(default)s)")
    d.add_argument("--eval-batch-size", type=int, default=DEFAULT_EVAL_BATCH, metavar="B",
                   help="evaluation windows per forward pass; each holds seq-len x vocabulary logits "
                   "(default: %(default)s)")
    d.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: MODEL_DIR)")
    d.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--low-memory", action="store_true",
                   help="for models bigger than memory: stream the blocks from the safetensors shards, one in memory "
                   "at a time, and write the pruned shards (unstructured / N:M pruning only; no perplexity). Chosen "
                   "by itself when the weights take more than half of the available memory")
    p.set_defaults(func=run)
    return p


# --- checks, all before any work ---------------------------------------------------------------------


def _num_blocks(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError``/``FileNotFoundError`` naming the first problem; changes nothing."""
    method = LLM_METHODS.get(args.method)
    nm = parse_pattern(args.pattern)
    if args.sparsity is not None:
        check_sparsity(args.sparsity, "--sparsity")
        if nm is not None and abs(args.sparsity - nm.sparsity) > 1e-9:
            raise ValueError(f"--pattern {nm.name} fixes the sparsity at {nm.sparsity:g}; leave --sparsity out")
    for name in ("samples", "seq_len", "eval_tokens", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    unstructured = nm is not None or args.sparsity != 0
    if not unstructured:
        given = [flag for flag, on in (("--allocation", args.allocation != "uniform"), ("--sequential", args.sequential),
                                       ("--recovery lsq", args.recovery == "lsq"), ("--exclude", bool(args.exclude)))
                 if on]
        if given:
            raise ValueError(f"{given[0]} tunes the unstructured pruning, which --sparsity 0 skips")
        if args.heads is None and args.blocks is None and args.mlp is None:
            raise ValueError("--sparsity 0 without --blocks, --heads or --mlp: nothing to prune")
    if args.allocation != "uniform":
        if nm is not None:
            raise ValueError(f"--allocation {args.allocation} spreads unstructured sparsity; --pattern fixes it per layer")
        if not method.needs_data:
            raise ValueError(f"--allocation {args.allocation} needs calibration statistics; --method {args.method} uses none")
    elif args.allocation_range is not None:
        raise ValueError("--allocation-range is for --allocation owl or sensitivity")
    if args.outlier_threshold is not None and args.allocation != "owl":
        raise ValueError("--outlier-threshold is OWL's M: it needs --allocation owl")
    if args.allocation_range is not None and not 0 < args.allocation_range < 1:
        raise ValueError(f"--allocation-range must be in (0, 1), got {args.allocation_range:g}")
    if args.outlier_threshold is not None and not args.outlier_threshold > 0:
        raise ValueError(f"--outlier-threshold must be positive, got {args.outlier_threshold:g}")
    if args.allocation != "uniform":
        lam, s = 0.08 if args.allocation_range is None else args.allocation_range, 0.5 if args.sparsity is None else args.sparsity
        if not (s - lam >= 0 and s + lam < 1):
            raise ValueError(f"--sparsity {s:g} +- --allocation-range {lam:g} leaves [0, 1)")
    if args.sequential and not method.needs_data:
        raise ValueError(f"--sequential changes the calibration statistics; --method {args.method} uses none")
    if args.recovery_steps is not None:
        if args.recovery is None:
            raise ValueError("--recovery-steps needs --recovery lsq or distill")
        if args.recovery_steps < 1:
            raise ValueError(f"--recovery-steps must be >= 1, got {args.recovery_steps}")
    for flag, value in (("--distill-lr", args.distill_lr), ("--hidden-weight", args.hidden_weight)):
        if value is not None and args.recovery != "distill":
            raise ValueError(f"{flag} needs --recovery distill")
    if args.distill_lr is not None and not args.distill_lr > 0:
        raise ValueError(f"--distill-lr must be positive, got {args.distill_lr:g}")
    if args.hidden_weight is not None and not args.hidden_weight >= 0:
        raise ValueError(f"--hidden-weight must be >= 0, got {args.hidden_weight:g}")
    if args.nm_out is not None and nm is None:
        raise ValueError("--nm-out writes the compact N:M format: it needs --pattern")
    if args.format == "compressed-tensors" and nm is None and args.sparsity == 0:
        raise ValueError("--format compressed-tensors stores sparse Linear layers; --sparsity 0 leaves none")
    if args.format == "compressed-tensors" and args.heads_scope != "uniform":
        raise ValueError("--format compressed-tensors needs shapes its config rebuilds; use --heads-scope uniform")
    if args.format == "compressed-tensors" and args.width_scope == "global":
        raise ValueError("--format compressed-tensors needs shapes its config rebuilds; use --width-scope uniform")
    if args.heads is not None and not 0 < args.heads < 1:
        raise ValueError(f"--heads must be a fraction of the heads in (0, 1), got {args.heads:g}")
    if args.head_importance is not None and args.heads is None:
        raise ValueError("--head-importance needs --heads")
    if args.heads_scope != "uniform" and args.heads is None:
        raise ValueError("--heads-scope needs --heads")
    if args.mlp is not None and not 0 < args.mlp < 1:
        raise ValueError(f"--mlp must be a fraction of the MLP channels in (0, 1), got {args.mlp:g}")
    for flag, value in (("--width-method", args.width_method), ("--width-scope", args.width_scope)):
        if value is not None and args.mlp is None:
            raise ValueError(f"{flag} needs --mlp")
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a Hugging Face model folder (no config.json)")
    config = json.loads((model / "config.json").read_text())
    if args.blocks is not None:
        total = _num_blocks(config)
        if args.blocks < 1 or (total is not None and args.blocks >= total):
            limit = f"in [1, {total - 1}] (the model has {total} blocks)" if total is not None else ">= 1"
            raise ValueError(f"--blocks must be {limit}, got {args.blocks}")
    if args.head_importance == "gradient" and not is_causal_lm(SimpleNamespace(**config)):
        raise ValueError("--head-importance gradient needs a language-modelling loss; this model is an encoder: "
                         "use --head-importance magnitude")
    for f in (args.calib or []) + (args.eval or []):
        if not Path(f).is_file():
            raise FileNotFoundError(f"text file not found: {f}")
    if args.nm_out is not None:
        nm_path = Path(args.nm_out).resolve()
        if nm_path.is_relative_to(Path(args.out).resolve()):
            raise ValueError(f"--nm-out {args.nm_out} lies inside --out: the output folder holds one model; "
                             "write the compact file elsewhere")
        if nm_path.is_dir():
            raise ValueError(f"--nm-out {args.nm_out} is a folder; give a file name")


# --- the run -----------------------------------------------------------------------------------------


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _sources(files: list[str] | None, builtin: str) -> Any:
    """What a text came from: each file with its SHA-256, or the name of the built-in split."""
    if not files:
        return builtin
    return [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size,
             "sha256": hashlib.sha256(Path(f).read_bytes()).hexdigest()} for f in files]


def _versions() -> dict:
    import transformers  # an optional extra, loaded already by load_model

    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _evaluate(model: Any, causal: bool, eval_data: Any, seq_len: int, batch_size: int, reference: Any = None) -> dict:
    if causal:
        total, count = negative_log_likelihood(model, eval_data, seq_len=seq_len, batch_size=batch_size)
        return {"perplexity": math.exp(total / count), "predicted_tokens": count}
    if reference is None:
        return {"embeddings": mean_pooled_embeddings(model, eval_data, batch_size)}
    return {"embedding_cosine": embedding_similarity(model, reference, eval_data, batch_size)}


def _plain_loadable(config: Any) -> bool:
    """Whether ``from_pretrained`` alone rebuilds the shapes (False: ``prunekit.llm.load_model`` is needed)."""
    info = getattr(config, "prunekit_attention", None)
    if info is not None:
        heads, kv = set(info["num_heads"]), set(info["num_kv_heads"])
        if not (len(heads) == 1 and len(kv) == 1 and getattr(config, "num_attention_heads", None) == min(heads)
                and getattr(config, "num_key_value_heads", None) == min(kv)):
            return False
    widths = set((getattr(config, "prunekit_mlp", None) or {}).get("widths") or [])
    fields = {getattr(config, f, None) for f in ("intermediate_size", "ffn_dim", "n_inner")}
    return not widths or (len(widths) == 1 and min(widths) in fields)


def run(args: argparse.Namespace) -> int:
    """Run ``prunekit llm`` (arguments from :func:`add_parser`); returns the exit status."""
    _check_args(args)
    if args.low_memory or needs_low_memory(args.model):
        return run_low_memory(args)
    inputs = [args.model, args.tokenizer, *(args.calib or []), *(args.eval or [])]
    with RunOutput(args.out, "--out", keep=[p for p in inputs if p]) as output:  # never replaces an input
        return _run(args, output)


def _run(args: argparse.Namespace, output: RunOutput) -> int:
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
    nm = parse_pattern(args.pattern)
    unstructured = nm is not None or args.sparsity != 0
    head_importance = args.head_importance or ("gradient" if causal else "magnitude")

    stream = tokenize_text(tokenizer, read_sources(args.calib, None, "text"))
    calibration = sample_windows(stream, args.samples, seq_len, args.seed)
    if causal:
        eval_text = read_sources(args.eval, None, "text") if args.eval else builtin_text("heldout")
        eval_data = tokenize_text(tokenizer, eval_text)[: args.eval_tokens]
        evaluation = {"source": _sources(args.eval, "built-in heldout"), "tokens": int(eval_data.numel()),
                      "seq_len": seq_len, "stride": seq_len, "batch_size": args.eval_batch_size,
                      "metric": "perplexity"}
    else:
        if args.eval:
            sentences = [s for s in read_sources(args.eval, None, "text").splitlines() if s.strip()]
        else:
            sentences = builtin_sentences("heldout", n=256)
        eval_data = encode(tokenizer, sentences, max_length=seq_len)
        evaluation = {"source": _sources(args.eval, "built-in heldout sentences (256)"), "sentences": len(sentences),
                      "max_length": seq_len, "batch_size": args.eval_batch_size,
                      "metric": "cosine of mean-pooled embeddings to the dense model's"}

    before = _evaluate(model, causal, eval_data, seq_len, args.eval_batch_size)
    params_before = sum(p.numel() for p in model.parameters())
    teacher = copy.deepcopy(model) if args.recovery == "distill" else None
    structured: dict[str, Any] = {}
    kept_blocks = None
    if args.blocks is not None:
        err.print(f"removing {args.blocks} blocks (angular distance)")
        total = len(find_blocks(model)[1])
        structured["blocks_removed"] = prune_layers(model, calibration, args.blocks, batch_size=args.batch_size)
        kept_blocks = [i for i in range(total) if i not in structured["blocks_removed"]]
    if args.heads is not None:
        err.print(f"removing {args.heads:.0%} of the attention heads ({head_importance})")
        removed = prune_heads(model, calibration, amount=args.heads, method=head_importance, scope=args.heads_scope,
                              batch_size=args.batch_size)
        structured["heads_removed"] = {str(b): h for b, h in removed.items()}
        structured["heads_per_block"] = [a.num_heads for a in attention_layers(model)]
    if args.mlp is not None:
        method = args.width_method or "flap"
        err.print(f"removing {args.mlp:.0%} of the MLP channels ({method})")
        width = prune_width(model, calibration, mlp=args.mlp, heads=0.0, method=method,
                            scope=args.width_scope or "uniform", batch_size=args.batch_size)
        structured["mlp_removed"] = {str(b): c for b, c in width.removed_channels.items()}
        structured["mlp_widths"] = width.mlp_widths
        structured["mlp_bias_compensated"] = width.compensated_mlp

    report = None
    if unstructured:
        callback, stop = (None, None)
        if not args.no_progress:
            callback, stop = rich_progress(args.method, console=err)
        options: dict[str, Any] = {}
        if args.allocation_range is not None:
            options["allocation_range"] = args.allocation_range
        if args.outlier_threshold is not None:
            options["outlier_threshold"] = args.outlier_threshold
        if args.recovery == "lsq" and args.recovery_steps is not None:
            options["recovery_steps"] = args.recovery_steps
        try:
            report = prune(model, calibration, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                           exclude=args.exclude, batch_size=args.batch_size, progress=callback or False,
                           sequential="layer" if args.sequential else "block", allocation=args.allocation,
                           recovery="lsq" if args.recovery == "lsq" else None, **options)
        finally:
            if stop is not None:
                stop()
    distilled = None
    if teacher is not None:
        steps = args.recovery_steps or RECOVERY_STEPS["distill"]
        callback, stop = (None, None)
        if not args.no_progress:
            callback, stop = rich_progress("distill", console=err, unit="steps", status="loss {value:.4f}")
        try:
            distilled = distill(model, teacher, calibration, steps=steps, batch_size=args.batch_size,
                                lr=1e-4 if args.distill_lr is None else args.distill_lr,
                                hidden_weight=args.hidden_weight or 0.0, layer_map=kept_blocks,
                                seed=args.seed, progress=callback or False)
        finally:
            if stop is not None:
                stop()
        del teacher
    after = _evaluate(model, causal, eval_data, seq_len, args.eval_batch_size, reference=before.get("embeddings"))
    achieved = float(model_sparsity(model)) if report is not None else 0.0
    params = sum(p.numel() for p in model.parameters())

    compressed = args.format == "compressed-tensors"
    if compressed and not _plain_loadable(model.config):
        raise ValueError("--format compressed-tensors: the heads left differ between blocks, which its config cannot "
                         "describe; nothing was written (use --format hf)")
    plan = plan_compressed(model) if compressed else None  # raises before anything is written
    nm_report = save_nm(model, args.nm_out, nm.name) if args.nm_out is not None else None
    with output.replacing() as tmp:
        ct_report = write_compressed(model, tmp, plan, tokenizer) if compressed else None
        if not compressed:
            save_pretrained(model, tmp, tokenizer)
        plain = _plain_loadable(model.config)
        auto = "AutoModelForCausalLM" if causal else "AutoModel"
        loader = f"transformers.{auto}.from_pretrained" if plain else "prunekit.llm.load_model"
        loader = "prunekit.llm.load_compressed" if compressed else loader
        dense_bytes = (tmp / "model.safetensors").stat().st_size if (tmp / "model.safetensors").is_file() else None
        files = sorted([p.name for p in tmp.iterdir()] + ["prune_report.json"])
        results = {
            "model": str(args.model),
            "arguments": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
            "versions": _versions(),
            "method": args.method if report is not None else None,
            "pattern": nm.name if nm else None,
            "sparsity": report.target_sparsity if report is not None else 0.0,
            "achieved_sparsity": achieved,
            "allocation": args.allocation,
            "sequential": "layer" if args.sequential else "block",
            "recovery": None if args.recovery is None else {
                "method": args.recovery, "steps": args.recovery_steps or RECOVERY_STEPS[args.recovery],
                **({"lr": 1e-4 if args.distill_lr is None else args.distill_lr,
                    "hidden_weight": args.hidden_weight or 0.0, "seconds": distilled.seconds,
                    "first_loss": distilled.losses[0], "last_loss": distilled.losses[-1]} if distilled else {})},
            "structured": structured,
            "parameters": {"before": params_before, "after": params},
            "calibration": {"source": _sources(args.calib, "built-in calibration"), "samples": args.samples,
                            "seq_len": seq_len, "seed": args.seed, "batch_size": args.batch_size,
                            "stream_tokens": int(stream.numel())},
            "evaluation": evaluation,
            "before": {k: v for k, v in before.items() if k != "embeddings"},
            "after": after,
            "prune": report.to_dict() if report is not None else None,
            "loader": loader,
            "files": files,
            "nm_file": {"path": str(Path(args.nm_out).resolve()), **nm_report.to_dict()} if nm_report else None,
            "format": args.format,
            "compressed_tensors": {**ct_report.to_dict(), "path": str(output.path)} if ct_report else None,
            "safetensors_bytes": dense_bytes,
            "wall_time_s": time.perf_counter() - start,
        }
        write_json(tmp / "prune_report.json", results)

    rows: list[dict] = []
    if causal:
        rows.append({"": f"perplexity (held-out, {before['predicted_tokens']} tokens)",
                     "dense": f"{before['perplexity']:.3f}", "pruned": f"{after['perplexity']:.3f}"})
    else:
        rows.append({"": "embedding cosine to dense", "dense": "1.0000", "pruned": f"{after['embedding_cosine']:.4f}"})
    if structured:
        rows.append({"": "parameters", "dense": f"{params_before / 1e6:.2f} M", "pruned": f"{params / 1e6:.2f} M"})
    rows.append({"": "sparsity of pruned layers", "dense": "0%", "pruned": f"{achieved:.1%}"})
    if report is not None:
        rows.append({"": "pruning time", "dense": "-", "pruned": f"{sum(report.block_seconds):.1f} s"})
    if nm_report is not None and dense_bytes is not None:
        mib = 2**20
        rows.append({"": f"{nm.name} layers: dense vs values + indices",
                     "dense": f"{nm_report.packed_dense_bytes / mib:.2f} MiB",
                     "pruned": f"{nm_report.packed_bytes / mib:.2f} MiB ({nm_report.packed_ratio:.2f}x smaller)"})
        rows.append({"": f"whole model: model.safetensors vs {Path(args.nm_out).name}",
                     "dense": f"{dense_bytes / mib:.2f} MiB", "pruned": f"{nm_report.file_bytes / mib:.2f} MiB"})
    if ct_report is not None:
        mib = 2**20
        rows.append({"": f"weights: dense vs {ct_report.format}", "dense": f"{ct_report.dense_bytes / mib:.2f} MiB",
                     "pruned": f"{ct_report.file_bytes / mib:.2f} MiB ({ct_report.ratio:.2f}x smaller)"})
    what = [f"{len(structured['blocks_removed'])} blocks"] if "blocks_removed" in structured else []
    what += [f"{args.heads:.0%} heads"] if args.heads is not None else []
    what += [f"{args.mlp:.0%} MLP channels"] if args.mlp is not None else []
    what += [f"{args.method} {nm.name if nm else f'{report.target_sparsity:.0%}'}"] if report is not None else []
    print_table(rows, [Column(""), Column("dense", align="right"), Column("pruned", align="right")],
                title=f"{', '.join(what)} on {Path(args.model).name}", console=console)
    console.print(f"wrote {output.path} ({', '.join(files)}); load it with {loader}"
                  + (f"; and {args.nm_out} (compact {nm.name})" if nm_report else ""), soft_wrap=True)
    return 0
