"""A compact, exact storage format for N:M-sparse weights: the kept values plus their positions.

A weight that has at most ``N`` non-zeros in every ``M`` consecutive entries along its input dimension
is stored as

* ``values``: ``(rows, cols * N / M)`` in the weight's own dtype: the ``N`` entries of every group, in
  increasing position (a group with fewer than ``N`` non-zeros pads with zeros at its first free positions);
* ``indices``: the position (``0 .. M-1``) of each stored value inside its group, packed into ``uint8``
  with ``ceil(log2 M)`` bits per index (2 bits for 2:4, so four indices per byte; 3 bits for 4:8).

The codec is :func:`prunekit.sparse_format.pack_nm`, the one ``prunekit.save(..., format="sparse")``
uses for its ``nm`` encoding; this module adds the whole-model file around it.

So a float32 2:4 weight takes ``0.5 * 4 + 0.5 * 2/8 = 2.125`` bytes per original entry instead of 4
(1.88x smaller); bfloat16 gives 1.78x (NVIDIA's 2:4 metadata uses the same 2 bits per kept value).
``unpack(pack(w))`` equals ``w`` exactly (every value; a pruned ``-0.0`` may come back as ``0.0``).

:func:`save_nm` writes a whole model's tensors to one safetensors file: weights that follow the pattern
as ``<name>::nm_values`` and ``<name>::nm_indices`` (with their shape and layout in the file's metadata),
every other tensor dense under its own name. :func:`load_nm` reads it back into a plain state dict.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..fileio import atomic_write
from ..masking import named_effective_tensors
from ..modules import is_gpt_conv1d, named_persistent_buffers
from ..sparse_format import index_bits, pack_nm, unpack_nm
from .methods import parse_pattern

__all__ = ["NMTensor", "pack", "unpack", "index_bits", "follows_pattern", "save_nm", "load_nm", "NMSaveReport"]

FORMAT = "prunekit-nm"
VERSION = 2  # 2: the indices are packed by sparse_format.pack_ints (ceil(log2 M) bits, most significant first)
_VALUES, _INDICES = "::nm_values", "::nm_indices"


@dataclass
class NMTensor:
    """One packed weight. ``shape`` is the original ``(rows, cols)`` (input dimension last)."""

    values: Tensor
    indices: Tensor  # uint8, packed
    shape: tuple[int, int]
    n: int
    m: int

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel()


def follows_pattern(weight: Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive entries along the last dimension has at most ``n`` non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % m:
        return False
    return bool((weight.reshape(weight.shape[0], -1, m) != 0).sum(dim=2).le(n).all())


def pack(weight: Tensor, pattern: str = "2:4") -> NMTensor:
    """Pack an ``(rows, cols)`` weight that follows ``pattern`` along its last dimension (``ValueError`` if not)."""
    nm = parse_pattern(pattern)
    n, m = nm.n, nm.m
    if weight.dim() != 2:
        raise ValueError(f"the N:M format packs 2-D weights, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"{nm.name}: {cols} columns are not divisible by M={m}")
    groups = weight.detach().reshape(rows, cols // m, m)
    nonzero = groups != 0
    if bool((nonzero.sum(dim=2) > n).any()):
        raise ValueError(f"the weight does not follow the {nm.name} pattern (some group has more than {n} non-zeros)")
    values, indices = pack_nm(groups.reshape(-1, m), nonzero.reshape(-1, m), n)
    return NMTensor(values.reshape(rows, cols // m * n).contiguous(), indices, (rows, cols), n, m)


def unpack(packed: NMTensor) -> Tensor:
    """The dense ``(rows, cols)`` weight."""
    rows, cols = packed.shape
    n, m = packed.n, packed.m
    groups, _ = unpack_nm(packed.values.reshape(-1, n), packed.indices, m)
    return groups.reshape(rows, cols)


@dataclass
class NMSaveReport:
    """What :func:`save_nm` wrote."""

    path: Path
    file_bytes: int
    dense_bytes: int  # the same tensors stored densely (tensor bytes, without file headers)
    packed: list[str]
    dense: list[str]
    packed_dense_bytes: int = 0  # the packed weights alone, stored densely
    packed_bytes: int = 0  # the same weights as values + indices

    @property
    def ratio(self) -> float:
        """Dense bytes over file bytes (the whole model)."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else float("inf")

    @property
    def packed_ratio(self) -> float:
        """Dense bytes over packed bytes of the N:M weights alone."""
        return self.packed_dense_bytes / self.packed_bytes if self.packed_bytes else float("nan")

    def to_dict(self) -> dict:
        return {"path": str(self.path), "file_bytes": self.file_bytes, "dense_bytes": self.dense_bytes,
                "ratio": self.ratio, "packed_dense_bytes": self.packed_dense_bytes, "packed_bytes": self.packed_bytes,
                "packed_ratio": self.packed_ratio, "packed": self.packed, "dense": self.dense}


def _input_last_layouts(model: nn.Module) -> dict[str, bool]:
    """``{weight name: transposed}`` for every Linear and Conv1D weight (Conv1D stores ``(in, out)``)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_gpt_conv1d(module):
            out[f"{name}.weight" if name else "weight"] = is_gpt_conv1d(module)
    return out


def save_nm(model: nn.Module, path: str | os.PathLike, pattern: str = "2:4") -> NMSaveReport:
    """Write every tensor of ``model`` (masks applied) to ``path``; the Linear/Conv1D weights that follow
    ``pattern`` are packed, the rest stored dense. The write is atomic."""
    from safetensors.torch import save as safetensors_bytes

    nm = parse_pattern(pattern)
    layouts = _input_last_layouts(model)
    tensors: dict[str, Tensor] = {}
    meta: dict[str, dict] = {}
    packed, dense, dense_bytes, packed_dense, packed_bytes = [], [], 0, 0, 0
    for name, value in named_effective_tensors(model):
        value = value.detach().cpu()
        dense_bytes += value.numel() * value.element_size()
        if name in layouts:
            matrix = value.t() if layouts[name] else value
            if matrix.shape[1] % nm.m == 0 and follows_pattern(matrix, nm.n, nm.m):
                p = pack(matrix, nm.name)
                tensors[name + _VALUES] = p.values
                tensors[name + _INDICES] = p.indices
                meta[name] = {"shape": list(p.shape), "n": nm.n, "m": nm.m, "transposed": layouts[name]}
                packed.append(name)
                packed_dense += value.numel() * value.element_size()
                packed_bytes += p.nbytes
                continue
        tensors[name] = value.contiguous()
        dense.append(name)
    for buf_name, buf in named_persistent_buffers(model):
        if buf_name not in tensors and buf_name not in meta:
            tensors[buf_name] = buf.detach().cpu().contiguous()
            dense_bytes += buf.numel() * buf.element_size()
            dense.append(buf_name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, safetensors_bytes(tensors, metadata={"format": FORMAT, "version": str(VERSION), "nm": json.dumps(meta)}))
    return NMSaveReport(path, path.stat().st_size, dense_bytes, packed, dense, packed_dense, packed_bytes)


def load_nm(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a file written by :func:`save_nm` as a dense state dict (``model.load_state_dict`` takes it)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"N:M file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a prunekit N:M file (format {metadata.get('format')!r})")
        if metadata.get("version") != str(VERSION):
            raise ValueError(f"{path} is N:M format version {metadata.get('version')}; this prunekit reads "
                             f"version {VERSION} (load it with the prunekit that wrote it and save it again)")
        meta = json.loads(metadata.get("nm", "{}"))
        state = {}
        for key in f.keys():
            if key.endswith(_VALUES) or key.endswith(_INDICES):
                continue
            state[key] = f.get_tensor(key)
        for name, info in meta.items():
            p = NMTensor(f.get_tensor(name + _VALUES), f.get_tensor(name + _INDICES), tuple(info["shape"]),
                         int(info["n"]), int(info["m"]))
            matrix = unpack(p)
            state[name] = matrix.t().contiguous() if info["transposed"] else matrix
    return state
