"""Sparse models in the compressed-tensors format (``sparse-24-bitmask``, ``sparse-bitmask``): save and load.

llm-compressor writes sparse checkpoints in this format and the ``compressed-tensors`` package (up to
0.14) decompresses them; :func:`save_compressed` writes the same folder with prunekit's own code and
:func:`load_compressed` reads one back without the package. The folder is a Hugging Face model folder:
``config.json`` (with the compression config below), ``model.safetensors``, the generation config and
the tokenizer. Every compressed ``nn.Linear`` weight ``<module>.weight`` of shape ``(rows, cols)`` (input
dimension last) is replaced by

``sparse-bitmask`` (any sparsity)
    ``<module>.compressed``: the non-zero entries in row-major order, 1-D, in the weight's dtype;
    ``<module>.bitmask``: ``uint8 (rows, ceil(cols / 8))``, one bit per entry, least significant bit
    first within each byte, each row padded to whole bytes; ``<module>.row_offsets``: ``int64 (rows,)``,
    where each row starts in ``compressed``; ``<module>.shape``: ``int64 [rows, cols]``.
``sparse-24-bitmask`` (at most 2 non-zeros in every 4 consecutive entries of a row)
    ``<module>.compressed``: ``(rows, cols / 2)``, exactly two entries of every group of four (a group
    with fewer non-zeros adds its first zero positions); ``<module>.bitmask`` as above, with exactly two
    bits set per group; ``<module>.shape``: ``int64 (2, 1)``.

Everything else (embeddings, norms, ``lm_head``, Linear layers left dense) is stored as it is. The
config records, as llm-compressor does::

    "quantization_config": {"quant_method": "compressed-tensors", "version": ..., "transform_config": {},
      "sparsity_config": {"format": "sparse-24-bitmask", "targets": ["Linear"], "ignore": ["lm_head", ...],
                          "global_sparsity": 0.47, "sparsity_structure": "2:4", ...}}

``ignore`` names every Linear stored dense: the output head (``lm_head``, as llm-compressor leaves it) and
layers below ``min_sparsity``. Decompression gives every value back exactly (a pruned ``-0.0`` comes
back as ``0.0``). A float32 2:4 weight takes ``2 + 1/8`` bytes per entry instead of 4 (1.88x smaller),
bfloat16 ``1 + 1/8`` instead of 2 (1.78x).

compressed-tensors 0.15 and later dropped these sparse formats, and transformers 5 needs 0.15 or later
for its compressed-tensors loader, so with transformers 5 the folder is read by :func:`load_compressed`
(or ``ModelCompressor.decompress`` of compressed-tensors 0.12-0.14), not by ``from_pretrained``.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..fileio import atomic_folder
from ..masking import named_effective_tensors
from ..modules import check_model, named_persistent_buffers
from .hf import check_model_dir, compression_config, model_class, offline, weight_files

__all__ = [
    "FORMATS",
    "CompressedPlan",
    "CompressedSaveReport",
    "save_compressed",
    "write_compressed",
    "plan_compressed",
    "load_compressed",
    "load_compressed_state_dict",
    "pack_bitmask",
    "pack_24_bitmask",
    "unpack_bitmask",
    "is_2_4",
]

SPARSE_24 = "sparse-24-bitmask"
SPARSE_BITMASK = "sparse-bitmask"
FORMATS = ("auto", SPARSE_24, SPARSE_BITMASK)
WEIGHTS_NAME = "model.safetensors"
# The layout is that of compressed-tensors' sparse compressors, unchanged from 0.9 to 0.14 (the last
# release that has them); the tests decompress it with 0.13.
LAYOUT_VERSION = "0.13.0"
_PARTS = ("compressed", "bitmask", "shape", "row_offsets")


# --- the codec ------------------------------------------------------------------------------------


def _pack_mask(kept: Tensor) -> Tensor:
    """``(rows, cols)`` bools as ``uint8 (rows, ceil(cols / 8))``, least significant bit first per byte."""
    return torch.from_numpy(np.packbits(kept.cpu().numpy(), axis=-1, bitorder="little"))


def _matrix(weight: Tensor) -> Tensor:
    if weight.dim() != 2:
        raise ValueError(f"the compressed-tensors sparse formats store 2-D weights, got shape {tuple(weight.shape)}")
    return weight.detach().cpu()


def is_2_4(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive entries along the last (input) dimension has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((weight.detach().reshape(weight.shape[0], -1, 4) != 0).sum(dim=2).le(2).all())


def pack_bitmask(weight: Tensor) -> dict[str, Tensor]:
    """A 2-D weight in the ``sparse-bitmask`` layout: ``{"compressed", "bitmask", "row_offsets", "shape"}``."""
    w = _matrix(weight)
    kept = w != 0
    counts = kept.sum(dim=1)
    return {"compressed": w[kept], "bitmask": _pack_mask(kept), "row_offsets": torch.cumsum(counts, 0) - counts,
            "shape": torch.tensor(list(w.shape), dtype=torch.int64)}


def pack_24_bitmask(weight: Tensor) -> dict[str, Tensor]:
    """A 2-D 2:4 weight in the ``sparse-24-bitmask`` layout: ``{"compressed", "bitmask", "shape"}``
    (``ValueError`` if a group of 4 along the last dimension holds more than 2 non-zeros)."""
    w = _matrix(weight)
    rows, cols = w.shape
    if cols % 4:
        raise ValueError(f"2:4 needs a multiple of 4 input columns, the weight has {cols}")
    groups = w.reshape(rows, cols // 4, 4)
    nonzero = groups != 0
    missing = 2 - nonzero.sum(dim=2, keepdim=True)
    if bool((missing < 0).any()):
        raise ValueError("the weight is not 2:4 (some group of 4 along the input dimension has more than 2 non-zeros)")
    # exactly two stored entries per group: the non-zeros, then the group's first zero positions
    free = ~nonzero
    kept = (nonzero | (free & (torch.cumsum(free.to(torch.int8), dim=2) <= missing))).reshape(rows, cols)
    return {"compressed": w[kept].reshape(rows, cols // 2), "bitmask": _pack_mask(kept),
            "shape": torch.tensor([[rows], [cols]], dtype=torch.int64)}


def unpack_bitmask(compressed: Tensor, bitmask: Tensor, shape: Iterable[int]) -> Tensor:
    """The dense weight from either layout's ``compressed`` values, ``bitmask`` and ``shape``."""
    rows, cols = (int(s) for s in torch.as_tensor(shape).reshape(-1).tolist())
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise ValueError(f"bitmask of dtype {bitmask.dtype} and shape {tuple(bitmask.shape)} does not fit a "
                         f"({rows}, {cols}) weight")
    kept = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little").astype(bool))
    if int(kept.sum()) != compressed.numel():
        raise ValueError(f"the bitmask marks {int(kept.sum())} entries but {compressed.numel()} values are stored")
    out = torch.zeros(rows, cols, dtype=compressed.dtype)
    out[kept] = compressed.reshape(-1)
    return out


# --- which layers, which format -------------------------------------------------------------------


@dataclass
class CompressedPlan:
    """What :func:`save_compressed` will write: the format and the Linear modules it compresses."""

    format: str
    targets: list[str]  # Linear modules stored compressed
    ignore: list[str]  # Linear modules stored dense
    global_sparsity: float  # zeros over every parameter of the model (the config's "average sparsity")
    not_2_4: list[str] = field(default_factory=list)  # targets that are not 2:4 (sparse-bitmask only)

    def sparsity_config(self) -> dict[str, Any]:
        """The ``sparsity_config`` entry of ``config.json``'s ``quantization_config``."""
        return {"format": self.format, "targets": ["Linear"], "ignore": self.ignore,
                "global_sparsity": self.global_sparsity, "registry_requires_subclass": False,
                "sparsity_structure": "2:4" if self.format == SPARSE_24 else "unstructured"}


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def plan_compressed(model: nn.Module, format: str = "auto", ignore: Iterable[str] = (),
                    min_sparsity: float = 0.1) -> CompressedPlan:
    """Choose the layers and the format without writing anything (``ValueError`` when they do not fit).

    Candidates are the ``nn.Linear`` modules except the output head (``lm_head``, left dense as
    llm-compressor does; embeddings are not Linear) and those matching ``ignore`` (names or globs). A
    candidate is compressed when at least ``min_sparsity`` of its weight is zero (below that the bitmask
    saves little or nothing); the others stay dense and are listed in the config's ``ignore``.
    ``format="auto"`` is ``sparse-24-bitmask`` when every compressed layer is 2:4 along its input
    dimension, else ``sparse-bitmask``; asking for ``sparse-24-bitmask`` when one is not is an error.
    """
    check_model(model, "save")
    if format not in FORMATS:
        raise ValueError(f"unknown compressed-tensors format {format!r}; one of {', '.join(FORMATS)}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    ignore = [ignore] if isinstance(ignore, str) else list(ignore)
    effective = dict(named_effective_tensors(model))
    head = _output_head(model)
    targets, dense, not_2_4 = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = effective.get(f"{name}.weight")
        if module is head or weight is None or _matches(name, ignore):  # None: tied to a tensor stored earlier
            dense.append(name)
            continue
        if float((weight == 0).float().mean()) < min_sparsity or weight.numel() == 0:
            dense.append(name)
            continue
        targets.append(name)
        if not is_2_4(weight):
            not_2_4.append(name)
    if not targets:
        raise ValueError(f"no Linear layer has at least {min_sparsity:.0%} zeros: nothing to compress "
                         "(prune the model first, or lower min_sparsity)")
    if format == SPARSE_24 and not_2_4:
        raise ValueError(f"sparse-24-bitmask needs every compressed Linear to be 2:4 along its input dimension; "
                         f"{len(not_2_4)} are not, e.g. {not_2_4[0]} (use format='sparse-bitmask' or 'auto', or "
                         "ignore those layers)")
    chosen = format if format != "auto" else (SPARSE_BITMASK if not_2_4 else SPARSE_24)
    zeros = sum(int((v == 0).sum()) for v in effective.values())
    total = sum(v.numel() for v in effective.values())
    return CompressedPlan(chosen, targets, dense, zeros / total if total else 0.0, not_2_4)


# --- saving ---------------------------------------------------------------------------------------


@dataclass
class CompressedSaveReport:
    """What :func:`save_compressed` wrote."""

    path: Path
    format: str
    compressed: list[str]  # Linear modules stored compressed
    dense: list[str]  # Linear modules stored dense (the config's ``ignore``)
    file_bytes: int  # model.safetensors
    dense_bytes: int  # the same tensors stored dense (tensor bytes, without the file header)
    compressed_dense_bytes: int  # the compressed weights alone, stored dense
    compressed_bytes: int  # the same weights in the format

    @property
    def ratio(self) -> float:
        """Dense tensor bytes over the bytes of ``model.safetensors`` (the whole model)."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else float("inf")

    @property
    def layer_ratio(self) -> float:
        """Dense bytes over compressed bytes of the compressed weights alone."""
        return self.compressed_dense_bytes / self.compressed_bytes if self.compressed_bytes else float("nan")

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "file_bytes": self.file_bytes,
                "dense_bytes": self.dense_bytes, "ratio": self.ratio, "compressed_dense_bytes": self.compressed_dense_bytes,
                "compressed_bytes": self.compressed_bytes, "layer_ratio": self.layer_ratio,
                "compressed": self.compressed, "dense": self.dense}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _compression_config(plan: CompressedPlan) -> dict[str, Any]:
    return {"quant_method": "compressed-tensors", "version": LAYOUT_VERSION, "sparsity_config": plan.sparsity_config(),
            "transform_config": {}}


def write_compressed(model: nn.Module, folder: str | os.PathLike, plan: CompressedPlan,
                     tokenizer: Any = None) -> CompressedSaveReport:
    """Write the files of ``plan`` into the existing ``folder`` (no atomicity: :func:`save_compressed`
    wraps this in an atomic folder; a caller with its own atomic output folder calls it directly)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = getattr(model, "config", None)
    targets = set(plan.targets)
    pack = pack_24_bitmask if plan.format == SPARSE_24 else pack_bitmask
    tensors: dict[str, Tensor] = {}
    dense_bytes = layer_dense = layer_packed = 0
    for name, value in named_effective_tensors(model):
        value = value.detach().cpu()
        dense_bytes += _nbytes(value)
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in targets:
            parts = pack(value)
            for part, tensor in parts.items():
                tensors[f"{module}.{part}"] = tensor.contiguous()
            layer_dense += _nbytes(value)
            layer_packed += sum(_nbytes(t) for t in parts.values())
        else:
            tensors[name] = value.contiguous()
    for name, buf in named_persistent_buffers(model):
        if name not in tensors:
            tensors[name] = buf.detach().cpu().contiguous()
            dense_bytes += _nbytes(buf)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text())
    data["architectures"] = [type(model).__name__]  # as save_pretrained records it (from_config leaves None)
    data["quantization_config"] = _compression_config(plan)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    size = (folder / WEIGHTS_NAME).stat().st_size
    return CompressedSaveReport(folder, plan.format, plan.targets, plan.ignore, size, dense_bytes, layer_dense,
                                layer_packed)


def save_compressed(model: nn.Module, path: str | os.PathLike, format: str = "auto", tokenizer: Any = None,
                    ignore: Iterable[str] = (), min_sparsity: float = 0.1) -> CompressedSaveReport:
    """Save a pruned Hugging Face model as a compressed-tensors folder that llm-compressor's tools read.

    ``format`` is ``"auto"`` (``sparse-24-bitmask`` when every compressed Linear is 2:4 along its input
    dimension, else ``sparse-bitmask``), ``"sparse-24-bitmask"`` or ``"sparse-bitmask"``. Which layers are
    compressed is :func:`plan_compressed`'s rule (every pruned ``nn.Linear`` except ``lm_head``).
    prunekit masks are applied to the written values; the model itself is not changed. Every check runs
    before anything is written, and the folder ``path`` is replaced as a whole on success (left as it was
    on failure). Returns a :class:`CompressedSaveReport` with the sizes.
    """
    plan = plan_compressed(model, format, ignore, min_sparsity)
    if not hasattr(getattr(model, "config", None), "save_pretrained"):
        raise ValueError("save_compressed writes a Hugging Face model folder: the model needs a transformers config "
                         "(model.config)")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must have save_pretrained, got {type(tokenizer).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    with atomic_folder(path) as tmp:
        report = write_compressed(model, tmp, plan, tokenizer)
    report.path = path
    return report


# --- loading --------------------------------------------------------------------------------------


def _sparsity_config(config: Any, where: Path) -> dict[str, Any]:
    qc = compression_config(config)
    if qc is None:
        raise ValueError(f"{where} is not a compressed-tensors model folder (config.json has no compressed-tensors "
                         "quantization_config)")
    if qc.get("config_groups"):
        raise ValueError(f"{where} holds a quantized compressed-tensors model; prunekit reads the sparse formats "
                         "only (load it with transformers and compressed-tensors)")
    sparsity = qc.get("sparsity_config") or {}
    fmt = sparsity.get("format", "dense")
    if fmt not in (SPARSE_24, SPARSE_BITMASK, "dense"):
        raise ValueError(f"{where}: compressed-tensors format {fmt!r} is not one prunekit reads "
                         f"({SPARSE_24}, {SPARSE_BITMASK}, dense)")
    return sparsity


def load_compressed_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The dense state dict of a compressed-tensors sparse folder (single or sharded safetensors)."""
    from safetensors import safe_open

    path = check_model_dir(path)
    import transformers as tf

    _sparsity_config(tf.AutoConfig.from_pretrained(str(path), local_files_only=True), path)
    state: dict[str, Tensor] = {}
    parts: dict[str, dict[str, Tensor]] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if part in _PARTS and module:
                    parts.setdefault(module, {})[part] = f.get_tensor(key)
                else:
                    state[key] = f.get_tensor(key)
    for module, p in parts.items():
        if not {"compressed", "bitmask", "shape"} <= p.keys():
            # e.g. a module whose own parameter is called "shape": not a compressed weight
            state.update({f"{module}.{k}": v for k, v in p.items()})
            continue
        state[f"{module}.weight"] = unpack_bitmask(p["compressed"], p["bitmask"], p["shape"])
    return state


def load_compressed(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A model from a compressed-tensors sparse folder (prunekit's or llm-compressor's), decompressed, in
    eval mode, without the compressed-tensors package. Its config no longer carries the compression.
    Every weight of the model must be in the folder (``ValueError`` naming the missing or unexpected ones)."""
    offline()
    path = check_model_dir(path)
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    _sparsity_config(config, path)
    del config.quantization_config  # the weights are dense from here on
    if dtype is None:  # the saved dtype, as from_pretrained reads it
        dtype = getattr(config, "dtype", None) if isinstance(getattr(config, "dtype", None), torch.dtype) else None
    model = model_class(config).from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    state = load_compressed_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    params = model.state_dict(keep_vars=True)
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in result.missing_keys if id(params[k]) not in loaded]  # a tied weight is loaded once
    if result.unexpected_keys or missing:
        raise ValueError(f"{path}: the weights do not fit the model of its config (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
    return model.eval()
