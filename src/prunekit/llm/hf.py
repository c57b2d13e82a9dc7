"""Loading and saving Hugging Face models offline, pruned ones included.

* :func:`load_model`: a local model folder, never the hub (``local_files_only``): a causal LM when the
  config names one, else the base model (an encoder such as BERT).
* :func:`save_pretrained`: bakes prunekit masks into the weights (``prunekit.finalize``) and writes the
  usual ``config.json`` + ``model.safetensors`` (and the tokenizer), so ``transformers`` loads the result
  as any other model.
* :func:`load_pretrained`: reloads a model whose attention heads were removed with different counts per
  block (or on OPT, GPT-2, BERT), or whose MLP widths differ per block: it builds the model from its config,
  shrinks every block's attention to the recorded ``config.prunekit_attention`` and its MLP to
  ``config.prunekit_mlp``, and loads the saved weights. For any other model it is :func:`load_model`.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..masking import finalize, masks

__all__ = [
    "load_model", "load_tokenizer", "save_pretrained", "load_pretrained", "is_causal_lm",
    "offline", "check_model_dir", "model_class", "weight_files", "compression_config",
]


def offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    return path


def is_causal_lm(config: Any) -> bool:
    """Whether the config's architectures name a causal language model."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or []))


def model_class(config: Any):
    import transformers as tf

    return tf.AutoModelForCausalLM if is_causal_lm(config) else tf.AutoModel


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A model from a local folder (no hub access), in eval mode; heads removed by prunekit are restored.
    A compressed-tensors sparse folder is refused (``ValueError``): ``prunekit.llm.load_compressed`` reads it."""
    offline()
    path = check_model_dir(path)
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if getattr(config, "prunekit_attention", None) is not None or getattr(config, "prunekit_mlp", None) is not None:
        return load_pretrained(path, dtype=dtype)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    ct = compression_config(config)
    if ct and (ct.get("sparsity_config") or {}).get("format", "dense") != "dense":
        # transformers 5 would leave the compressed Linear weights random, with a warning only
        raise ValueError(f"{path} holds a compressed-tensors sparse model (sparse-bitmask / sparse-24-bitmask), which "
                         "transformers 5 does not decompress: load it with prunekit.llm.load_compressed")
    return model_class(config).from_pretrained(str(path), **kwargs).eval()


def compression_config(config: Any) -> dict | None:
    """A model config's compressed-tensors ``quantization_config`` as a dict (llm-compressor's record of
    its sparse or quantized layout), else None."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    return qc if qc and qc.get("quant_method") == "compressed-tensors" else None


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a local folder (``ValueError`` naming the folder when it has none)."""
    offline()
    import transformers as tf

    try:
        return tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"cannot load a tokenizer from {path}: {error}; pass --tokenizer DIR") from None


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Finalize masks (pruned entries become stored zeros) and ``model.save_pretrained`` with safetensors."""
    path = Path(path)
    if masks(model):
        finalize(model)
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(path), **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors")
    return [single]


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Reload a saved model whose attention heads prunekit removed (any counts per block) or whose MLP widths
    it pruned (``config.prunekit_mlp``, any width per block)."""
    offline()
    path = check_model_dir(path)
    import transformers as tf
    from safetensors.torch import load_file

    from .heads import attention_layers, remove_heads
    from .width import mlp_layers, remove_mlp_channels

    config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    info = getattr(config, "prunekit_attention", None)
    widths = (getattr(config, "prunekit_mlp", None) or {}).get("widths")
    if info is None and widths is None:
        return load_model(path, dtype=dtype)
    model = model_class(config).from_config(config)
    if info is not None:
        attns = attention_layers(model)
        heads, kv = info["num_heads"], info["num_kv_heads"]
        if len(heads) != len(attns):
            raise ValueError(f"config.prunekit_attention lists {len(heads)} blocks, the model has {len(attns)}")
        plan = {}
        for a, h, k in zip(attns, heads, kv):
            g_old, g_new = a.group_size, h // k
            plan[a.block] = [j * g_old + i for j in range(a.num_kv_heads) for i in range(g_old)
                             if j >= k or i >= g_new]
        remove_heads(model, plan)
    if widths is not None:
        mlps = mlp_layers(model)
        if len(widths) != len(mlps):
            raise ValueError(f"config.prunekit_mlp lists {len(widths)} blocks, the model has {len(mlps)}")
        remove_mlp_channels(model, {m.block: range(w, m.width) for m, w in zip(mlps, widths) if w < m.width})
    state = {}
    for f in _weight_files(path):
        state.update(load_file(str(f)))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: unexpected weights {result.unexpected_keys[:3]}")
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ValueError(f"{path}: missing weights {missing[:3]}")
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# The helpers other loaders build on (compressed-tensors, streaming), under public names.
weight_files = _weight_files  # the safetensors files of a folder (single or sharded)
