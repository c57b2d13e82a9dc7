"""Hugging Face configs that follow structured surgery, and reloading a saved pruned model.

After surgery, :func:`sync_config` records every resized layer in ``config.prunekit_structure`` (the
record ``pk.save`` keeps in its metadata) and updates the config's own size fields where every layer
agrees and the config can express them (``intermediate_size``; Llama-style head counts). A folder written
by ``model.save_pretrained`` is reloaded with :func:`load_pretrained`, which builds the model from its
config, resizes it to the record and loads the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..modules import is_gpt_conv1d
from .hf import attention_layout, prepare, weight_out
from .persist import STRUCTURE_KEY, Structure, structure_metadata

__all__ = ["sync_config", "load_pretrained", "mlp_layers"]


# --------------------------------------------------------------------------------------------------
# Configs and reloading
# --------------------------------------------------------------------------------------------------


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and len(set(values)) == 1 else None


def sync_config(model: nn.Module, mlp: list[str] = ()) -> None:
    """After surgery: record every resized layer in ``config.prunekit_structure`` (what
    :func:`load_pretrained` needs) and update the config's own size fields where every layer agrees and
    the config accepts the value (``intermediate_size`` of the ``mlp`` layers, see :func:`mlp_layers`;
    Llama-style head counts). ``hidden_size`` stays: transformers' layers require it to be a multiple of the
    head count, so a pruned hidden width lives in ``prunekit_structure`` only."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    meta = structure_metadata(model)
    if STRUCTURE_KEY in meta:
        config.prunekit_structure = json.loads(meta[STRUCTURE_KEY])
    attns = [a for a in (attention_layout(m) for m in model.modules()) if a is not None]
    fields: dict[str, Any] = {}
    llama = [a for a in attns if a.style == "llama"]
    if llama and len(llama) == len(attns):
        heads = _uniform([weight_out(a.q) // a.head_dim for a in llama])
        kv = _uniform([weight_out(a.k) // a.head_dim for a in llama])
        if heads and kv and getattr(config, "head_dim", None) == llama[0].head_dim:
            fields.update(num_attention_heads=heads, num_key_value_heads=kv)
    modules = dict(model.named_modules())
    width = _uniform([weight_out(modules[n]) for n in mlp if n in modules])
    if width is not None:
        fields["intermediate_size"] = width
    validate = getattr(config, "validate", None)
    for key, value in fields.items():
        previous = getattr(config, key)
        setattr(config, key, value)
        try:  # transformers' strict configs may refuse (e.g. hidden_size % num_attention_heads)
            if callable(validate):
                validate()
        except Exception:  # noqa: BLE001 - the size stays recorded in prunekit_structure
            setattr(config, key, previous)


def mlp_layers(model: nn.Module) -> list[str]:
    """The layers writing the MLP hidden width (output width ``config.intermediate_size``); taken before
    surgery, they tell :func:`sync_config` which widths ``intermediate_size`` describes."""
    size = getattr(getattr(model, "config", None), "intermediate_size", None)
    if not isinstance(size, int):
        return []
    return [n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_gpt_conv1d(m)) and weight_out(m) == size]


def load_pretrained(path: str | os.PathLike, model_class: Any = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Reload a structurally pruned model saved with ``model.save_pretrained(path)``.

    The model is built from its config (the class named by ``config.architectures``, or ``model_class``),
    resized to the layers recorded in ``config.prunekit_structure`` right after it is built, and loaded by
    ``from_pretrained`` itself (its key renaming and weight tying included). A folder without a record
    loads as usual.
    """
    import transformers as tf

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        if not names or not hasattr(tf, names[0]):
            raise ValueError(f"{path}: config.architectures names no transformers class; pass model_class=")
        model_class = getattr(tf, names[0])
    record = getattr(config, "prunekit_structure", None)
    if record is None:
        return model_class.from_pretrained(str(path), local_files_only=True, dtype=dtype).eval()
    structure = Structure(record)

    class Pruned(model_class):  # transformers builds it, we resize it, transformers loads the weights
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            prepare(self)
            structure.apply(self)

    Pruned.__name__ = Pruned.__qualname__ = model_class.__name__
    kwargs = {"local_files_only": True} | ({"dtype": dtype} if dtype is not None else {})
    model = Pruned.from_pretrained(str(path), **kwargs)
    model.__class__ = model_class
    return model.eval()
