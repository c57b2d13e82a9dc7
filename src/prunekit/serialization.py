"""``save`` and ``load``: safetensors files with masks included; nothing is ever unpickled.

The file holds every parameter and buffer under its user-facing name with pruned entries zero (so it is
also a plain, finalized checkpoint that ``safetensors.torch.load_file`` + ``load_state_dict`` accept), plus
one ``__mask__.<name>`` bool tensor per mask. Metadata records the format version. Writing is atomic
(:mod:`prunekit.fileio`), so a failed save never leaves a half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import masking, sparse_format
from .fileio import atomic_write

__all__ = ["save", "load", "state_tensors", "MASK_PREFIX"]

MASK_PREFIX = "__mask__."
FORMAT_VERSION = "1"
FORMATS = ("dense", "sparse")  # sparse: prunekit.sparse_format (bitmask + values, CSR or N:M per tensor)


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by clean name (masked values applied), plus the masks."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if masking._PARAMETRIZED in "." + key:
            if key.endswith(".original"):
                name = masking.clean_name(key)
                if name not in tensors:
                    mask = masking.get_mask(model, name)
                    tensors[name] = value * mask if mask is not None else value
            continue  # masks are written once each, below
        tensors[key] = value
    for name, mask in masking.masks(model).items():
        tensors[MASK_PREFIX + name] = mask
    # safetensors refuses tensors that share storage (tied weights, views): give those their own copy.
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        value = value.detach().contiguous()
        whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
        if value.data_ptr() in seen or not whole:
            value = value.clone()
        seen.add(value.data_ptr())
        out[key] = value
    return out


def save(model: nn.Module, path: str | os.PathLike, format: str = "dense", metadata: dict | None = None) -> Path:
    """Write ``model`` (weights, buffers and masks) to a safetensors file, atomically.

    ``format="dense"`` stores every tensor whole (a plain checkpoint plus ``__mask__.`` tensors);
    ``format="sparse"`` stores masked and mostly-zero tensors compressed (see
    :mod:`prunekit.sparse_format`); ``load`` reads both and restores exactly the same model."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r} (known: {', '.join(FORMATS)})")
    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(f"cannot save to {path}: the folder {path.parent} does not exist")
    tensors = state_tensors(model)
    meta = {"prunekit_format": FORMAT_VERSION, "format": format, **{k: str(v) for k, v in (metadata or {}).items()}}
    from .structured.persist import structure_metadata  # physically pruned layers: their new shapes

    meta.update(structure_metadata(model))
    if format == "sparse":
        tensors, sparse_meta = sparse_format.encode(tensors)
        meta.update(sparse_meta)
    payload = safetensors_bytes({k: v.cpu() for k, v in tensors.items()}, metadata=meta)
    return atomic_write(path, payload)


def load(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a file written by ``save`` into ``model`` (a fresh instance of the same architecture, pruned
    or not): weights, buffers and masks. Everything is checked before the model is touched."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    device = next(iter(model.parameters()), torch.empty(0)).device
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        meta = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if sparse_format.is_sparse(meta):
        tensors = sparse_format.decode(tensors, meta)
    masks = {k[len(MASK_PREFIX):]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    values = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}

    from .structured.persist import Structure  # a physically pruned model: resize the fresh one first

    structure = Structure.from_metadata(meta)
    expected = dict(_clean_state_shapes(model))
    problems = [] if structure is None else structure.check(model)
    if structure is not None:
        expected = structure.expected_shapes(expected)
    for name, value in values.items():
        if name not in expected:
            if strict:
                problems.append(f"unexpected tensor {name!r} in the file")
        elif tuple(value.shape) != expected[name]:
            problems.append(f"{name}: the file has shape {tuple(value.shape)}, the model {expected[name]}")
    if strict:
        problems += [f"missing tensor {n!r}" for n in expected if n not in values]
    for name, mask in masks.items():
        if name not in values or tuple(mask.shape) != tuple(values[name].shape):
            problems.append(f"mask {name!r} does not fit a tensor of the file")
    if problems:
        raise ValueError(f"{path.name} does not fit this model: " + "; ".join(problems[:10]))
    if meta.get("prunekit_format") not in (None, FORMAT_VERSION):
        raise ValueError(f"{path.name} has prunekit format {meta.get('prunekit_format')}, expected {FORMAT_VERSION}")

    if structure is not None:
        structure.apply(model)
    with torch.no_grad():
        for name, mask in masks.items():
            masking.attach(model, name, torch.ones_like(mask, dtype=torch.bool))
            current = masking.get_mask(model, name)
            current.copy_(mask.to(current.device))  # replace (not tighten): the file is the truth
        by_key = _clean_to_state_keys(model)
        state = {by_key[n]: v.to(device) for n, v in values.items() if n in by_key}
        model.load_state_dict(state, strict=False)
    return model


def _clean_state_shapes(model: nn.Module):
    for key, value in model.state_dict().items():
        if masking._PARAMETRIZED in "." + key:
            if key.endswith(".original"):
                yield masking.clean_name(key), tuple(value.shape)
            continue
        yield key, tuple(value.shape)


def _clean_to_state_keys(model: nn.Module) -> dict[str, str]:
    out = {}
    for key in model.state_dict():
        if masking._PARAMETRIZED in "." + key:
            if key.endswith(".original"):
                out[masking.clean_name(key)] = key
            continue
        out[key] = key
    return out


def read_metadata(path: str | os.PathLike) -> dict:
    """The string metadata stored in a saved file."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})
