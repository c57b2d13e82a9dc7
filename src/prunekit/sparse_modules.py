"""Sparse-kernel layers for CPU inference: Linear and Conv2d computed with ``torch.sparse`` CSR or BSR.

:class:`SparseLinear` and :class:`SparseConv2d` hold the weight as plain buffers (state_dict, deepcopy
and ``.to()`` work as usual) and compute ``y = W x`` with a sparse matrix product; a convolution is
``unfold`` (im2col) followed by that product. Grouped, transposed, 1-D/3-D convolutions and
``padding="same"`` are not supported (:func:`conv_unsupported` says why). :mod:`prunekit.export`
decides, by measurement, where they pay.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


__all__ = ["SparseLinear", "SparseConv2d", "SPARSE_MODULES", "LAYOUTS", "sparse_layers", "to_sparse", "conv_unsupported"]

LAYOUTS = ("csr", "bsr")


@contextmanager
def _quiet() -> Iterator[None]:
    """torch warns once per process that sparse CSR/BSR support is in beta; we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        yield


class _SparseMatrix(nn.Module):
    """A sparse ``(rows, cols)`` weight kept as plain buffers (``crow_indices``, ``col_indices``,
    ``values``: state_dict, deepcopy and ``.to()`` work as usual); the ``torch.sparse`` tensor is built
    from them once and cached."""

    def _store(self, matrix: Tensor, layout: str, blocksize: int | None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown sparse layout {layout!r} (known: {', '.join(LAYOUTS)})")
        matrix = matrix.detach()
        if layout == "bsr" and (not blocksize or matrix.shape[0] % blocksize or matrix.shape[1] % blocksize):
            raise ValueError(f"BSR needs a block size dividing the weight's shape {tuple(matrix.shape)}")
        with _quiet():
            sparse = matrix.to_sparse_csr() if layout == "csr" else matrix.to_sparse_bsr((blocksize, blocksize))
        index = torch.int32 if sparse.values().numel() < 2**31 else torch.int64  # int32: faster kernels
        self.register_buffer("crow_indices", sparse.crow_indices().to(index))
        self.register_buffer("col_indices", sparse.col_indices().to(index))
        self.register_buffer("values", sparse.values().contiguous())
        self.layout = layout
        self.blocksize = blocksize
        self.matrix_shape = tuple(matrix.shape)
        self.dense_s: float | None = None  # measured times, filled in by sparsify
        self.sparse_s: float | None = None
        self._cached: tuple[tuple, Tensor] | None = None

    @property
    def nnz(self) -> int:
        """Non-zero weights (BSR blocks may also store zeros)."""
        return int(torch.count_nonzero(self.values))

    def sparse_weight(self) -> Tensor:
        """The weight as a ``torch.sparse`` CSR/BSR tensor (rebuilt only when the buffers change)."""
        parts = (self.crow_indices, self.col_indices, self.values)
        key = tuple((t.data_ptr(), t.device, t.dtype, tuple(t.shape)) for t in parts)
        if self._cached is None or self._cached[0] != key:
            build = torch.sparse_csr_tensor if self.layout == "csr" else torch.sparse_bsr_tensor
            with _quiet():
                tensor = build(self.crow_indices, self.col_indices, self.values, self.matrix_shape,
                               check_invariants=False)
            self._cached = (key, tensor)
        return self._cached[1]

    def _matmul(self, columns: Tensor, bias: Tensor | None) -> Tensor:
        """``weight @ columns (+ bias[:, None])`` for a ``(cols, n)`` dense matrix."""
        weight = self.sparse_weight()
        if columns.shape[1] == 1 and self.layout == "csr":  # matrix-vector: a faster kernel
            vector = columns[:, 0]
            out = torch.addmv(bias, weight, vector) if bias is not None else torch.mv(weight, vector)
            return out.unsqueeze(1)
        if bias is not None:
            return torch.addmm(bias.unsqueeze(1), weight, columns)
        return torch.mm(weight, columns)

    def __getstate__(self) -> dict:  # deepcopy/pickle: sparse tensors have no storage to copy
        state = self.__dict__.copy()
        state["_cached"] = None
        return state

    def _measured(self) -> str:
        if self.dense_s and self.sparse_s:
            return f", measured {self.dense_s / self.sparse_s:.2f}x faster"
        return ""


class SparseLinear(_SparseMatrix):
    """``nn.Linear`` computed with a sparse weight (CSR or BSR): ``y = x @ W.T + b`` for any leading
    dimensions of ``x``. Build it with :meth:`from_dense`."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, layout: str = "csr",
                 blocksize: int | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._store(weight, layout, blocksize)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(cls, linear: nn.Linear, layout: str = "csr", blocksize: int | None = None) -> SparseLinear:
        """The sparse version of a Linear layer (its effective weight: a mask is applied)."""
        return cls(linear.weight, linear.bias, layout, blocksize)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        columns = x.reshape(-1, self.in_features).t()
        return self._matmul(columns, self.bias).t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        block = f" {self.blocksize}x{self.blocksize}" if self.layout == "bsr" else ""
        density = self.nnz / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.layout}{block}, density={density:.3f}{self._measured()}")


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def conv_unsupported(conv: nn.Module) -> str | None:
    """Why a convolution cannot be computed by :class:`SparseConv2d` (``None`` when it can)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not supported (Conv2d only)"
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str) and conv.padding != "valid":
        return f"padding={conv.padding!r}"
    return None


class SparseConv2d(_SparseMatrix):
    """``nn.Conv2d`` (groups=1, zero padding) as ``unfold`` (im2col) and a sparse matrix product with
    the ``(out_channels, in_channels * kh * kw)`` weight. Build it with :meth:`from_dense`."""

    def __init__(self, conv: nn.Conv2d, layout: str = "csr", blocksize: int | None = None) -> None:
        super().__init__()
        reason = conv_unsupported(conv)
        if reason is not None:
            raise ValueError(f"SparseConv2d cannot compute this convolution: {reason}")
        weight = conv.weight
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = _pair(conv.kernel_size)
        self.stride, self.dilation = _pair(conv.stride), _pair(conv.dilation)
        self.padding = (0, 0) if conv.padding == "valid" else _pair(conv.padding)
        self._store(weight.reshape(weight.shape[0], -1), layout, blocksize)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, layout: str = "csr", blocksize: int | None = None) -> SparseConv2d:
        return cls(conv, layout, blocksize)

    def _out_size(self, size: int, i: int) -> int:
        k, s, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
        return (size + 2 * p - d * (k - 1) - 1) // s + 1

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (n, c*k*k, L)
        # one sparse product per example: a single product with all n * L columns would need a transposed
        # copy of cols, and the sparse kernel is much slower on such wide matrices (cache misses)
        out = cols.new_empty(n, self.out_channels, cols.shape[2])
        weight = self.sparse_weight()
        for i in range(n):
            if self.bias is not None:
                torch.addmm(self.bias.unsqueeze(1), weight, cols[i], out=out[i])
            else:
                torch.mm(weight, cols[i], out=out[i])
        out = out.view(n, self.out_channels, self._out_size(h, 0), self._out_size(w, 1))
        return out[0] if unbatched else out

    def extra_repr(self) -> str:
        density = self.nnz / math.prod(self.matrix_shape)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"layout={self.layout}, density={density:.3f}{self._measured()}")


SPARSE_MODULES = (SparseLinear, SparseConv2d)


def sparse_layers(model: nn.Module) -> dict[str, _SparseMatrix]:
    """The sparse modules of a model, by name (what :func:`sparsify` converted)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SPARSE_MODULES)}


def to_sparse(module: nn.Module, layout: str = "csr", blocksize: int | None = None) -> _SparseMatrix:
    """The sparse-kernel twin of a Linear or Conv2d layer (its current weights, masks applied)."""
    if isinstance(module, nn.Linear):
        return SparseLinear.from_dense(module, layout, blocksize)
    return SparseConv2d.from_dense(module, layout, blocksize)
