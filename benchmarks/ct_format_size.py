#!/usr/bin/env python
"""File sizes of a pruned LLM in the compressed-tensors sparse formats against the dense safetensors.

A Llama with SmolLM-135M's shape (30 blocks, width 576, MLP 1536, 9 query / 3 key-value heads, vocabulary
49152, tied embeddings; random weights, seeded) is pruned by magnitude, 2:4 and 50% unstructured, in
bfloat16 and float32, and written three ways: ``pk.llm.save_pretrained`` (dense), ``pk.llm.save_compressed``
(compressed-tensors) and ``pk.llm.save_nm`` (prunekit's N:M file, 2:4 only). Every compressed folder is
read back with ``pk.llm.load_compressed`` and compared with the pruned weights bit for bit.

    .venv/bin/python benchmarks/ct_format_size.py            # ~1 minute, ~2 GB of memory
    .venv/bin/python benchmarks/ct_format_size.py --blocks 2 # smoke run

Results go to ``benchmarks/results/ct_format_size.{md,json}`` (``--no-save``: printed only).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import prunekit as pk  # noqa: E402
from measuring import save_results  # noqa: E402  (atomic .md and .json)
from prunekit.llm.methods import parse_pattern  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def smollm_shaped(blocks: int, dtype: torch.dtype):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=blocks,
                            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).to(dtype).eval()


def prune_by_magnitude(model, pattern: str | None) -> None:
    """Zero the smallest weights of every Linear inside the blocks (2:4 per group of 4 inputs, or 50% per row)."""
    nm = parse_pattern(pattern) if pattern else None
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight
                if nm is not None:
                    w.mul_(nm.keep_best(w.float().abs()).to(w.dtype))
                else:
                    k = w.shape[1] // 2
                    drop = w.float().abs().topk(k, dim=1, largest=False).indices
                    w.scatter_(1, drop, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for pattern in ("2:4", None):
            model = smollm_shaped(args.blocks, dtype)
            prune_by_magnitude(model, pattern)
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                pk.llm.save_pretrained(model, tmp / "dense")
                dense = (tmp / "dense" / "model.safetensors").stat().st_size
                report = pk.llm.save_compressed(model, tmp / "ct")
                state = pk.llm.ct_format.load_compressed_state_dict(tmp / "ct")
                expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
                exact = state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
                nm = pk.llm.save_nm(model, tmp / "m.nm.safetensors", "2:4").file_bytes if pattern else None
            rows.append({"dtype": str(dtype).replace("torch.", ""), "pruning": pattern or "50% unstructured",
                         "format": report.format, "dense_bytes": dense, "ct_bytes": report.file_bytes,
                         "ratio": dense / report.file_bytes, "layer_ratio": report.layer_ratio, "nm_bytes": nm,
                         "exact": exact})
            del model
    mib = 2**20
    lines = [f"Llama with SmolLM-135M's shape ({args.blocks} blocks, tied embeddings), random weights, magnitude "
             "pruning of the blocks' Linear layers; `model.safetensors` sizes.", "",
             "| dtype | pruning | format | dense | compressed-tensors | whole file | pruned layers | prunekit N:M | "
             "read back exactly |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        nm = f"{r['nm_bytes'] / mib:.1f} MiB" if r["nm_bytes"] else "-"
        lines.append(f"| {r['dtype']} | {r['pruning']} | `{r['format']}` | {r['dense_bytes'] / mib:.1f} MiB | "
                     f"{r['ct_bytes'] / mib:.1f} MiB | {r['ratio']:.2f}x smaller | {r['layer_ratio']:.2f}x smaller | "
                     f"{nm} | {'yes' if r['exact'] else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        save_results(RESULTS, "ct_format_size", text, rows)
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
