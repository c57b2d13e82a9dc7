"""``save`` and ``load``: safetensors files with masks included, checksummed; nothing is ever unpickled.

The file holds every parameter and buffer under its user-facing name with pruned entries zero (so it is
also a plain, finalized checkpoint that ``safetensors.torch.load_file`` + ``load_state_dict`` accept), plus
one ``__mask__.<name>`` bool tensor per mask. Metadata records the format version. Writing is atomic
(:mod:`prunekit.fileio`), so a failed save never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import masking, sparse_format
from .fileio import atomic_write

__all__ = ["save", "load", "file_bytes", "state_tensors", "MASK_PREFIX"]

MASK_PREFIX = "__mask__."
FORMAT_VERSION = "1"
FORMATS = ("dense", "sparse")  # sparse: prunekit.sparse_format (bitmask + values, CSR or N:M per tensor)


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by clean name (masked values applied), plus the masks."""
    tensors: dict[str, torch.Tensor] = {}
    for name, key, value in masking.clean_state_items(model.state_dict()):  # masks: written once each, below
        if key == name:
            tensors[key] = value
        elif name not in tensors:  # a masked parameter: its effective value
            mask = masking.get_mask(model, name)
            tensors[name] = value * mask if mask is not None else value
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


CHECKSUM_KEY = "prunekit_sha256"


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (what ``save`` stores)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        if value.numel():
            digest.update(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def save(model: nn.Module, path: str | os.PathLike, format: str = "dense", metadata: dict | None = None) -> Path:
    """Write ``model`` (weights, buffers and masks) to a safetensors file, atomically.

    ``format="dense"`` stores every tensor whole (a plain checkpoint plus ``__mask__.`` tensors);
    ``format="sparse"`` stores masked and mostly-zero tensors compressed (see
    :mod:`prunekit.sparse_format`); ``load`` reads both and restores exactly the same model. The
    metadata holds a SHA-256 of the stored tensors (``prunekit_sha256``), which ``load`` verifies."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save needs an nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r} (known: {', '.join(FORMATS)})")
    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(f"cannot save to {path}: the folder {path.parent} does not exist")
    return atomic_write(path, file_bytes(model, format, metadata))


def file_bytes(model: nn.Module, format: str = "dense", metadata: dict | None = None) -> bytes:
    """The bytes :func:`save` writes for ``model``: its tensors (:func:`state_tensors`, compressed with
    ``format="sparse"``) and metadata (format, ``metadata`` as strings, the shapes of physically pruned
    layers, the checksum)."""
    tensors = state_tensors(model)
    meta = {"prunekit_format": FORMAT_VERSION, "format": format, **{k: str(v) for k, v in (metadata or {}).items()}}
    # lazily: the structured package is loaded only when used, so that ``import prunekit`` stays light
    from .structured.persist import structure_metadata  # physically pruned layers: their new shapes

    meta.update(structure_metadata(model))
    if format == "sparse":
        tensors, sparse_meta = sparse_format.encode(tensors)
        meta.update(sparse_meta)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    meta[CHECKSUM_KEY] = checksum(tensors)
    return safetensors_bytes(tensors, metadata=meta)


def _read(path: Path, verify: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The file's metadata and tensors; a clear error naming the file when it is not readable."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
        ) from None
    expected = meta.get(CHECKSUM_KEY)
    if verify and expected is not None and checksum(tensors) != expected:
        raise ValueError(
            f"{path} is corrupt: its tensors do not match the checksum stored when it was saved "
            "(pass verify=False to load it anyway)"
        )
    return meta, tensors


def load(model: nn.Module, path: str | os.PathLike, strict: bool = True, verify: bool = True) -> nn.Module:
    """Load a file written by ``save`` into ``model`` (a fresh instance of the same architecture, pruned
    or not): weights, buffers and masks. Everything is checked before the model is touched.

    The file is the truth: afterwards the model computes exactly what the saved model computed, so a
    mask the model has but the file does not is removed. A model on the ``meta`` device is materialised
    on the CPU from the file (``strict=True`` only: every tensor must come from it). ``verify=False``
    skips the checksum (faster for big files)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load needs an nn.Module to load into, got {type(model).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    meta, tensors = _read(path, verify)
    if sparse_format.is_sparse(meta):
        try:
            tensors = sparse_format.decode(tensors, meta)
        except (ValueError, RuntimeError, IndexError) as error:
            raise ValueError(f"{path}: {error}") from None
    masks = {k[len(MASK_PREFIX):]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    values = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}

    from .structured.persist import Structure  # a physically pruned model: resize the fresh one first

    structure = Structure.from_metadata(meta)
    expected = {name: tuple(v.shape) for name, _, v in masking.clean_state_items(model.state_dict())}
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
    stale = [n for n in masking.masks(model) if n not in masks]
    problems += [f"{n} has other parametrizations besides its mask" for n in stale if not masking.removable(model, n)]
    on_meta = _on_meta(model)
    if on_meta:
        if not strict:
            problems.append("the model is on the meta device: only strict=True can materialise it from the file")
        problems += [f"non-persistent buffer {n!r} is in no file: materialising the meta model would lose it"
                     for n in _volatile(model)]
    if problems:
        raise ValueError(f"{path} does not fit this model: " + "; ".join(problems[:10]))
    if meta.get("prunekit_format") not in (None, FORMAT_VERSION):
        raise ValueError(f"{path} has prunekit format {meta.get('prunekit_format')}, expected {FORMAT_VERSION}")

    if on_meta:
        model.to_empty(device="cpu")  # every tensor is then overwritten from the file (strict)
    device = next(iter(model.parameters()), torch.empty(0)).device
    if structure is not None:
        structure.apply(model)
    with torch.no_grad():
        for name in stale:  # the file is the truth: no mask it does not hold
            masking.remove(model, name)
        for name, mask in masks.items():
            masking.attach(model, name, torch.ones_like(mask, dtype=torch.bool))
            current = masking.get_mask(model, name)
            current.copy_(mask.to(current.device))  # replace (not tighten): the file is the truth
        by_key = {name: key for name, key, _ in masking.clean_state_items(model.state_dict())}
        state = {by_key[n]: v.to(device) for n, v in values.items() if n in by_key}
        model.load_state_dict(state, strict=False)
    return model


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def _volatile(model: nn.Module) -> list[str]:
    """Non-persistent buffers (no file holds them), by name."""
    out = []
    for module_name, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                out.append(f"{module_name}.{name}" if module_name else name)
    return out


def read_metadata(path: str | os.PathLike) -> dict:
    """The string metadata stored in a saved file."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})
