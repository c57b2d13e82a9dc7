"""The compressed ("sparse") file format: encoders and decoders for masked and mostly-zero tensors.

``prunekit.save(model, path, format="sparse")`` passes the same tensors it would write densely (clean
names, pruned entries zero, one ``__mask__.<name>`` bool tensor per mask) through :func:`encode`, and
``prunekit.load`` passes what it reads through :func:`decode`, which gives back exactly those tensors.
Each tensor is stored in whichever of these encodings is smallest:

``bitmask``
    the mask packed 8 entries per byte, plus the kept values in order: ``nnz * itemsize + numel / 8``
    bytes. Smallest for moderate sparsity (at 90%: 10% of dense plus 1/32 for the bits in float32).
``csr``
    compressed sparse rows over the ``(shape[0], -1)`` view: kept values, their column indices in the
    smallest integer type that holds them (uint8, int16, int32) and one int32/int64 row pointer per row.
    Smallest at very high sparsity (above ~94% for int16 columns).
``nm``
    an N:M pattern (exactly N kept in every block of M consecutive entries along dimension 1, or 0):
    the kept values plus each one's position in its block, bit-packed (``ceil(log2 M)`` bits each).
    Chosen when no larger than the bitmask (2:4 ties and is stored as N:M; 1:4, 2:8 are smaller).
``dense``
    the tensor as it is (unmasked tensors whose zeros do not pay for an encoding, integer buffers).
``alias``
    a tensor bit-for-bit equal to one stored earlier (tied weights): stored once.

A tensor without a mask but with many exact zeros (a finalized model) is encoded the same way with the
implicit mask "bits != 0" (or "bits != -0.0" when ``-0.0`` is the more frequent zero, as in a pruned
model's state dict loaded into a plain model; ``"fill": "-0"``), so every value, either zero included,
comes back bit for bit; only tensors with a
mask give a mask back. Everything the decoder needs (encoding, shape, dtype, N, M, dimension) is in the
file's metadata under ``prunekit_sparse`` as JSON; the tensors are stored under ``<name>::<part>``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "encode",
    "decode",
    "METADATA_KEY",
    "ENCODINGS",
    "pack_bits",
    "unpack_bits",
    "pack_ints",
    "unpack_ints",
    "index_bits",
    "pack_nm",
    "unpack_nm",
    "find_nm",
]

METADATA_KEY = "prunekit_sparse"
MASK_PREFIX = "__mask__."  # the same prefix as prunekit.serialization (which imports this module)
VERSION = 1
ENCODINGS = ("dense", "bitmask", "csr", "nm", "alias")
_SEP = "::"
_NM_BLOCKS = (4, 8, 16, 2)  # block sizes M tried when looking for an N:M pattern
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


# --- bit packing --------------------------------------------------------------------------------


def pack_bits(bits: Tensor) -> Tensor:
    """A flat bool tensor as uint8, 8 entries per byte, most significant bit first (like numpy.packbits)."""
    return torch.from_numpy(np.packbits(bits.detach().reshape(-1).to(torch.bool).cpu().numpy()))


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a flat bool tensor."""
    return (packed.reshape(-1, 1) & _BITS).ne(0).reshape(-1)[:count]


def pack_ints(values: Tensor, bits: int) -> Tensor:
    """Non-negative integers below ``2**bits``, each written with ``bits`` bits (most significant first),
    one after the other into uint8 bytes: ``ceil(len * bits / 8)`` bytes."""
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64)
    return pack_bits((values.detach().reshape(-1, 1).cpu().to(torch.int64) >> shifts) & 1)


def unpack_ints(packed: Tensor, count: int, bits: int) -> Tensor:
    """Inverse of :func:`pack_ints`: the first ``count`` integers, as int64."""
    weights = 1 << torch.arange(bits - 1, -1, -1, dtype=torch.int64)
    return (unpack_bits(packed.cpu(), count * bits).view(count, bits).to(torch.int64) * weights).sum(dim=1)


# --- the N:M codec --------------------------------------------------------------------------------


def index_bits(m: int) -> int:
    """Bits per stored position inside a block of ``m``: ``ceil(log2 m)``, at least 1 (2 for 2:4)."""
    return max(1, (m - 1).bit_length())


def pack_nm(blocks: Tensor, kept: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(values, positions)`` of ``(G, M)`` value ``blocks`` whose ``kept`` entries are at most ``n`` per
    block: ``values`` is ``(G, n)``, the ``n`` chosen entries of every block in increasing position (the
    kept ones; a block with fewer pads with its first free positions), ``positions`` their places in the
    block, packed with :func:`index_bits` bits each by :func:`pack_ints`."""
    m = blocks.shape[1]
    order = torch.arange(m, device=blocks.device)
    key = kept.to(torch.long) * m + (m - 1 - order)  # kept entries first, then lower positions first
    chosen = torch.topk(key, n, dim=1).indices.sort(dim=1).values
    return blocks.gather(1, chosen), pack_ints(chosen, index_bits(m))


def unpack_nm(values: Tensor, positions: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_nm`: the ``(G, M)`` value blocks (zero where nothing is stored) and the
    bool blocks of the stored positions."""
    groups, n = values.shape
    where = unpack_ints(positions, groups * n, index_bits(m)).view(groups, n).to(values.device)
    out = torch.zeros(groups, m, dtype=values.dtype, device=values.device).scatter_(1, where, values)
    stored = torch.zeros(groups, m, dtype=torch.bool, device=values.device).scatter_(1, where, True)
    return out, stored


# --- sizes --------------------------------------------------------------------------------------


def _index_dtype(limit: int) -> torch.dtype:
    """The smallest integer type holding ``0 .. limit - 1``."""
    if limit <= 1 << 8:
        return torch.uint8
    if limit <= 1 << 15:
        return torch.int16
    if limit <= 1 << 31:
        return torch.int32
    return torch.int64


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    rows = shape[0]
    return rows, (math.prod(shape) // rows if rows else 0)


def _nbytes(encoding: str, numel: int, nnz: int, itemsize: int, shape: tuple[int, ...], nm=None) -> int:
    if encoding == "dense":
        return numel * itemsize
    if encoding == "bitmask":
        return nnz * itemsize + (numel + 7) // 8
    if encoding == "csr":
        rows, cols = _rows_cols(shape)
        pointer = 4 if nnz < 1 << 31 else 8
        return nnz * (itemsize + _itemsize(_index_dtype(cols))) + (rows + 1) * pointer
    if encoding == "nm":
        _, m, _ = nm
        return nnz * itemsize + (nnz * index_bits(m) + 7) // 8
    raise ValueError(encoding)


# --- N:M detection --------------------------------------------------------------------------------


def _blocks(x: Tensor, dim: int, m: int) -> Tensor:
    return x.movedim(dim, -1).reshape(-1, m)


def find_nm(mask: Tensor) -> tuple[int, int, int] | None:
    """``(n, m, dim)`` when exactly ``n`` of every ``m`` consecutive entries along ``dim`` (1, else 0)
    are kept, with ``n < m``; the pattern with the smallest encoding if several fit; else ``None``."""
    if mask.dim() < 2 or mask.numel() == 0:
        return None
    nnz = int(mask.count_nonzero())
    best = None
    for dim in (1, 0):
        for m in _NM_BLOCKS:
            if mask.shape[dim] % m:
                continue
            first = [0] * mask.dim()
            first[dim] = slice(0, m)
            n = int(mask[tuple(first)].count_nonzero())
            if not (0 < n < m) or nnz * m != n * mask.numel():  # cheap necessary conditions first
                continue
            counts = _blocks(mask, dim, m).to(torch.uint8).sum(dim=1, dtype=torch.int32)
            if bool((counts == n).all()):
                cost = n * index_bits(m) / m  # index bits per entry
                if best is None or cost < best[0]:
                    best = (cost, (n, m, dim))
    return None if best is None else best[1]


# --- one tensor ---------------------------------------------------------------------------------


def _bit_view(x: Tensor) -> Tensor:
    """The tensor's bits as integers of the same width (so that -0.0 counts as non-zero)."""
    by_size = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.view(by_size[x.element_size()])


def _choose(value: Tensor, mask: Tensor, masked: bool) -> tuple[str, tuple | None]:
    numel, nnz, item = value.numel(), int(mask.count_nonzero()), value.element_size()
    shape = tuple(value.shape)
    nm = find_nm(mask) if masked else None
    options = [("nm", nm)] if nm is not None else []  # first, so that N:M wins ties
    options += [("bitmask", None), ("csr", None)]
    if not masked:
        options.append(("dense", None))  # no mask to keep: plain storage when nothing pays
    sizes = [(_nbytes(enc, numel, nnz, item, shape, extra), i) for i, (enc, extra) in enumerate(options)]
    return options[min(sizes)[1]]


def _encode_one(name: str, value: Tensor, mask: Tensor | None) -> tuple[dict, dict[str, Tensor]]:
    info = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."), "masked": mask is not None}
    if mask is None:
        if not value.is_floating_point() or value.numel() < 64:
            return {**info, "encoding": "dense"}, {name: value}
        bits = _bit_view(value)
        negative_zero = _bit_view(torch.tensor([-0.0], dtype=value.dtype))[0]
        # the zero that is more frequent is left out: +0.0, or -0.0 (a masked model's state dict marks
        # its pruned entries so, see prunekit.masking); the other one is stored like any value
        if int((bits == negative_zero).sum()) > int((bits == 0).sum()):
            info["fill"] = "-0"
            kept = bits.ne(negative_zero)
        else:
            kept = bits.ne(0)
    else:
        kept = mask.to(torch.bool)
    encoding, extra = _choose(value, kept, mask is not None)
    info["encoding"] = encoding
    if encoding == "dense":
        return info, {name: value}
    key = name + _SEP
    if encoding == "nm":
        n, m, dim = extra
        info.update(n=n, m=m, dim=dim)
        values, positions = pack_nm(_blocks(value, dim, m), _blocks(kept, dim, m), n)
        return info, {key + "values": values.reshape(-1), key + "indices": positions}
    values = value.reshape(-1)[kept.reshape(-1)]
    if encoding == "bitmask":
        return info, {key + "values": values, key + "bitmask": pack_bits(kept)}
    rows, cols = _rows_cols(tuple(value.shape))
    grid = kept.reshape(rows, cols)
    pointer = torch.int32 if values.numel() < 1 << 31 else torch.int64
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = grid.sum(dim=1).cumsum(0)
    columns = grid.nonzero()[:, 1].to(_index_dtype(cols))
    return info, {key + "values": values, key + "crow": crow.to(pointer), key + "col": columns}


def _decode_one(name: str, info: Mapping, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(value, kept)`` of one encoded tensor."""
    shape = tuple(info["shape"])
    dtype = getattr(torch, info["dtype"])
    numel = math.prod(shape)
    key = name + _SEP
    encoding = info["encoding"]
    if encoding == "bitmask":
        kept = unpack_bits(tensors[key + "bitmask"], numel).reshape(shape)
    elif encoding == "csr":
        rows, cols = _rows_cols(shape)
        crow = tensors[key + "crow"].to(torch.int64)
        row_of = torch.repeat_interleave(torch.arange(rows), crow.diff())
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[row_of * cols + tensors[key + "col"].to(torch.int64)] = True
        kept = flat.reshape(shape)
    elif encoding == "nm":
        n, m, dim = info["n"], info["m"], info["dim"]
        moved = list(shape)
        moved.append(moved.pop(dim))
        value, blocks = unpack_nm(tensors[key + "values"].to(dtype).view(-1, n), tensors[key + "indices"], m)
        kept = blocks.reshape(moved).movedim(-1, dim)
        return value.reshape(moved).movedim(-1, dim).contiguous(), kept.contiguous()
    else:
        raise ValueError(f"{name}: unknown encoding {encoding!r} in the file (known: {', '.join(ENCODINGS)})")
    value = torch.full((numel,), -0.0 if info.get("fill") == "-0" else 0.0, dtype=dtype)
    value[kept.reshape(-1)] = tensors[key + "values"]
    return value.reshape(shape), kept


# --- whole files --------------------------------------------------------------------------------


def _fingerprint(value: Tensor) -> tuple:
    """Cheap: dtype, shape and a sample of the bits (equal tensors have equal fingerprints)."""
    flat = _bit_view(value.reshape(-1))
    step = max(1, flat.numel() // 4096)
    return (value.dtype, tuple(value.shape), int(flat[::step].to(torch.int64).sum()))


def encode(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Compress what ``prunekit.save`` would store densely.

    ``tensors`` maps clean names to values (pruned entries zero) and ``"__mask__." + name`` to each
    masked tensor's bool mask. Returns the tensors to write and the metadata (``{"prunekit_sparse":
    JSON}``) that :func:`decode` needs.
    """
    masks = {k[len(MASK_PREFIX):]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    unknown = [name for name in masks if name not in tensors]
    if unknown:
        raise ValueError(f"masks without a tensor: {', '.join(unknown)}")
    out: dict[str, Tensor] = {}
    entries: dict[str, dict] = {}
    seen: dict[tuple, list[str]] = {}
    for name, value in tensors.items():
        if name.startswith(MASK_PREFIX):
            continue
        if _SEP in name:
            raise ValueError(f"tensor name {name!r} contains {_SEP!r}, which the sparse format reserves")
        value = value.detach().cpu().contiguous()
        mask = masks.get(name)
        mask = None if mask is None else mask.detach().cpu().to(torch.bool)
        fingerprint = _fingerprint(value)
        twin = next(
            (
                other for other in seen.get(fingerprint, [])
                if torch.equal(_bit_view(value), _bit_view(tensors[other].detach().cpu()))
                and (mask is None or (other in masks and torch.equal(mask, masks[other].detach().cpu().to(torch.bool))))
            ),
            None,
        )
        if twin is not None:
            entries[name] = {"encoding": "alias", "of": twin, "masked": mask is not None}
            continue
        seen.setdefault(fingerprint, []).append(name)
        info, parts = _encode_one(name, value, mask)
        entries[name] = info
        out.update(parts)
    meta = {"version": VERSION, "tensors": entries}
    return out, {METADATA_KEY: json.dumps(meta, separators=(",", ":"))}


def is_sparse(metadata: Mapping[str, str]) -> bool:
    """Whether a file's metadata says it was written by :func:`encode`."""
    return METADATA_KEY in metadata


def decode(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Tensor]:
    """Inverse of :func:`encode`: the dense tensors and ``__mask__.`` masks, exactly as they were."""
    try:
        meta = json.loads(metadata[METADATA_KEY])
        entries = meta["tensors"]
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"the sparse file's metadata is unreadable ({error})") from None
    if meta.get("version") != VERSION:
        raise ValueError(f"sparse format version {meta.get('version')} is not supported (this prunekit reads {VERSION})")
    out: dict[str, Tensor] = {}
    try:
        for name, info in entries.items():
            if info["encoding"] == "alias":
                continue
            if info["encoding"] == "dense":
                out[name] = tensors[name]
                continue
            value, kept = _decode_one(name, info, tensors)
            out[name] = value
            if info["masked"]:
                out[MASK_PREFIX + name] = kept
        for name, info in entries.items():
            if info["encoding"] == "alias":
                out[name] = out[info["of"]].clone()
                if info["masked"]:
                    out[MASK_PREFIX + name] = out[MASK_PREFIX + info["of"]].clone()
    except KeyError as error:
        raise ValueError(f"the sparse file lacks the tensor {error.args[0]!r}; it is truncated or corrupt") from None
    return out
