"""Reading a sharded safetensors checkpoint one tensor at a time, and writing one the same way.

* :class:`Checkpoint`: the tensors of a Hugging Face model folder (``model.safetensors``, or the shards
  listed by ``model.safetensors.index.json``): name -> file, dtype and shape, read from the headers only;
  :meth:`Checkpoint.read` loads the named tensors (each file opened with ``safe_open`` for the call, then
  closed, so no mapping of the file stays resident).
* :class:`ShardWriter`: writes tensors into shards of at most ``max_shard_size`` bytes, in an order fixed
  in advance (the names and shapes are known before the values exist). Each shard's header is written
  when the shard is opened, then every tensor's bytes are appended as they arrive and released by the
  caller: nothing is kept in memory but the tensor being written. :meth:`ShardWriter.close` writes
  ``model.safetensors.index.json`` when there are several shards (one shard is ``model.safetensors``),
  the layout ``transformers.from_pretrained`` reads.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch import Tensor

__all__ = ["Checkpoint", "TensorInfo", "ShardWriter", "parse_size", "DTYPES"]

#: safetensors dtype names -> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"2GB"``, ``"500MB"``, ``"1GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        found = re.fullmatch(r"([0-9]*\.?[0-9]+)([KMG]I?B|B)?", str(size).strip().upper().replace(" ", ""))
        if found is None:
            raise ValueError(f"max_shard_size must be bytes or a size such as '2GB', got {size!r}")
        value = int(float(found[1]) * _UNITS[found[2] or ""])
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: its file, safetensors dtype name and shape."""

    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * DTYPES[self.dtype].itemsize


class Checkpoint:
    """The safetensors tensors of a model folder, by name (headers read; no values loaded)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise ValueError(f"{index} is not a safetensors index ({error})") from None
            files = list(dict.fromkeys(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            found = "pytorch_model.bin" if any(self.folder.glob("pytorch_model*.bin")) else "no weights"
            raise FileNotFoundError(f"{self.folder} has no model.safetensors (nor {INDEX}); it holds {found}. "
                                    "Streaming reads safetensors only: convert with save_pretrained first")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists the shard {name}, which is missing")
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    dtype = s.get_dtype()
                    if dtype not in DTYPES:
                        raise ValueError(f"{path.name}: tensor {key} has dtype {dtype}, which prunekit cannot stream")
                    self.tensors[key] = TensorInfo(path, dtype, tuple(s.get_shape()))

    @property
    def nbytes(self) -> int:
        """The tensors' bytes (the weight files' size less their headers)."""
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The named tensors, each file opened once for the call and closed after."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key)
        return out


def _header(entries: Sequence[tuple[str, TensorInfo]]) -> tuple[bytes, int]:
    """A safetensors header for ``entries`` in that order, padded to 8 bytes, and the data size."""
    meta: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, info in entries:
        meta[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


class ShardWriter:
    """Write the tensors of ``plan`` (``[(name, info)]``, in the order they will be written) into
    ``folder``, in shards of at most ``max_shard_size`` bytes (a larger tensor gets a shard of its own)."""

    def __init__(self, folder: str | os.PathLike, plan: Sequence[tuple[str, TensorInfo]], max_shard_size: int) -> None:
        self.folder = Path(folder)
        shards: list[list[tuple[str, TensorInfo]]] = [[]]
        size = 0
        for name, info in plan:
            if shards[-1] and size + info.nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, info))
            size += info.nbytes
        n = len(shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = shards
        self._order = [(i, name, info) for i, shard in enumerate(shards) for name, info in shard]
        self._next = 0
        self._handle: IO[bytes] | None = None
        self._open_shard = -1

    @property
    def expected(self) -> str | None:
        """The name of the tensor to write next (None when all are written)."""
        return self._order[self._next][1] if self._next < len(self._order) else None

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next tensor of the plan (its name, dtype and shape must be the planned ones)."""
        if self._next >= len(self._order):
            raise RuntimeError(f"every planned tensor is written; got {name} too")
        shard, planned, info = self._order[self._next]
        if name != planned:
            raise RuntimeError(f"tensors are written in the planned order: expected {planned}, got {name}")
        if _NAMES.get(tensor.dtype) != info.dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(f"{name}: planned {info.dtype} {info.shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        if shard != self._open_shard:
            self._finish_shard()
            self._handle = open(self.folder / self.files[shard], "wb")
            self._open_shard = shard
            self._handle.write(_header(self._shards[shard])[0])
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._next += 1

    def _finish_shard(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def close(self) -> list[Path]:
        """Finish the last shard and write the index (several shards); returns the files written."""
        if self._next != len(self._order):
            raise RuntimeError(f"{len(self._order) - self._next} planned tensors were not written (next: {self.expected})")
        self._finish_shard()
        paths = [self.folder / f for f in self.files]
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(info.nbytes for _, _, info in self._order)},
                     "weight_map": {name: self.files[shard] for shard, name, _ in self._order}}
            path = self.folder / INDEX
            path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            paths.append(path)
        return paths

    def abort(self) -> None:
        """Close the open shard without completing it (the caller discards the folder)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
