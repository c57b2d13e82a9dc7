"""What is removed: elements, vectors, kernels, channels, or N:M blocks.

A granularity views a parameter as ``G`` groups of ``E`` entries (a ``(G, E)`` matrix), reduces element
scores to one score per group, and expands a per-group decision back to an element mask.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
from torch import Tensor

from .registry import Registry
from .targets import Target

__all__ = ["Granularity", "NM", "GRANULARITIES", "get_granularity", "GROUP_NORMS"]

GROUP_NORMS = ("l1", "l2")
_NEG_INF = float("-inf")


class Granularity:
    """Elements grouped along some dimensions. Subclasses define the ``(G, E)`` view."""

    name: ClassVar[str] = ""

    def check(self, target: Target) -> None:
        """Raise ``ValueError`` naming the layer when this granularity does not apply to it."""

    def _moved(self, target: Target) -> int | None:
        """The dimension moved to the front before flattening into groups (None: plain reshape)."""
        return None

    def _groups(self, target: Target) -> int:
        raise NotImplementedError

    def num_groups(self, target: Target) -> int:
        return self._groups(target)

    def to_groups(self, x: Tensor, target: Target) -> Tensor:
        """``x`` (the parameter's shape) as a ``(G, E)`` matrix."""
        dim = self._moved(target)
        if dim is not None:
            x = x.movedim(dim, 0)
        return x.reshape(self._groups(target), -1)

    def from_groups(self, x: Tensor, target: Target) -> Tensor:
        """Inverse of ``to_groups``."""
        shape = list(target.shape)
        dim = self._moved(target)
        if dim is None:
            return x.reshape(shape)
        moved = [shape[dim]] + shape[:dim] + shape[dim + 1 :]
        return x.reshape(moved).movedim(0, dim)

    def reduce(self, scores: Tensor, kept: Tensor | None, target: Target, norm: str, signed: bool) -> Tensor:
        """One score per group: the L1 (or L2) norm of its kept entries' scores (their sum when the
        scores are signed). Fully pruned groups get ``-inf``, so they are counted as pruned first."""
        s = self.to_groups(scores, target)
        k = None if kept is None else self.to_groups(kept, target)
        if signed:
            values = s if k is None else s.masked_fill(~k, 0.0)
            group = values.sum(dim=1)
        else:
            values = s.abs() if norm == "l1" else s.square()
            if k is not None:
                values = values.masked_fill(~k, 0.0)
            group = values.sum(dim=1)
            if norm == "l2":
                group = group.sqrt()
        if k is not None:
            group = group.masked_fill(~k.any(dim=1), _NEG_INF)
        return group

    def expand(self, group_keep: Tensor, target: Target) -> Tensor:
        """A per-group keep decision (``(G,)`` bool) as an element mask of the parameter's shape."""
        g = self._groups(target)
        e = target.numel() // g
        return self.from_groups(group_keep.reshape(g, 1).expand(g, e), target)

    def __repr__(self) -> str:
        return self.name


GRANULARITIES: Registry[type[Granularity]] = Registry("granularity")


@GRANULARITIES.register("element", "single weights (unstructured)")
class Element(Granularity):
    """Single weights: every entry is its own group (unstructured)."""

    def _groups(self, target: Target) -> int:
        return target.numel()

    def reduce(self, scores: Tensor, kept: Tensor | None, target: Target, norm: str, signed: bool) -> Tensor:
        scores = scores.reshape(-1)
        if kept is not None:
            scores = scores.masked_fill(~kept.reshape(-1), _NEG_INF)
        return scores

    def expand(self, group_keep: Tensor, target: Target) -> Tensor:
        return group_keep.reshape(target.shape)


def _need_dims(target: Target, ndim: int, what: str) -> None:
    if len(target.shape) < ndim:
        raise ValueError(
            f"{what} granularity needs a parameter with at least {ndim} dimensions; "
            f"{target.name} has shape {target.shape}"
        )


@GRANULARITIES.register("vector", "1-D rows along the last dim: a Linear's output-neuron rows, a conv kernel's rows")
class Vector(Granularity):
    """1-D vectors along the last dimension: a Linear's rows (one output neuron's fan-in), a conv kernel's rows."""

    def check(self, target: Target) -> None:
        _need_dims(target, 2, "vector")

    def _groups(self, target: Target) -> int:
        return target.numel() // target.shape[-1]


@GRANULARITIES.register("column", "input units: a Linear's columns, a conv's input channels")
class Column(Granularity):
    """Everything that reads one input unit: a Linear's columns (input neurons), a conv's input channels."""

    def check(self, target: Target) -> None:
        _need_dims(target, 2, "column")

    def _moved(self, target: Target) -> int:
        return target.in_dim

    def _groups(self, target: Target) -> int:
        return target.shape[target.in_dim]


@GRANULARITIES.register("kernel", "k x k kernels of a convolution")
class Kernel(Granularity):
    """One k x k kernel of a convolution (a filter's slice for one input channel)."""

    def check(self, target: Target) -> None:
        _need_dims(target, 3, "kernel")

    def _groups(self, target: Target) -> int:
        return target.shape[0] * target.shape[1]


@GRANULARITIES.register("channel", "whole filters / output neurons, as masks")
class Channel(Granularity):
    """Whole output units: a conv filter, a Linear's output neuron (as masks; see ``prunekit.structured``
    for physical removal)."""

    def _moved(self, target: Target) -> int:
        return target.out_dim

    def _groups(self, target: Target) -> int:
        return target.shape[target.out_dim]


@GRANULARITIES.register("n:m", "at most N non-zeros per M consecutive inputs, e.g. '2:4', '4:8' (semi-structured)")
class NM(Granularity):
    """At most N non-zeros in every M consecutive weights along the input dimension (2:4 for sparse tensor
    cores). For a convolution the blocks run along input channels at each kernel position."""

    def __init__(self, n: int, m: int) -> None:
        if not (0 < n <= m):
            raise ValueError(f"N:M pattern needs 0 < N <= M, got {n}:{m}")
        self.n, self.m = n, m
        self.name = f"{n}:{m}"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check(self, target: Target) -> None:
        _need_dims(target, 2, f"{self.name}")
        size = target.shape[target.in_dim]
        if size % self.m:
            raise ValueError(
                f"{self.name} pattern: the input dimension of {target.name} has size {size}, "
                f"not divisible by M={self.m}"
            )

    def to_groups(self, x: Tensor, target: Target) -> Tensor:
        return x.movedim(target.in_dim, -1).reshape(-1, self.m)

    def from_groups(self, x: Tensor, target: Target) -> Tensor:
        shape = list(target.shape)
        moved = shape[: target.in_dim] + shape[target.in_dim + 1 :] + [shape[target.in_dim]]
        return x.reshape(moved).movedim(-1, target.in_dim)

    def _groups(self, target: Target) -> int:
        return target.numel() // self.m

    def keep_best(self, scores: Tensor) -> Tensor:
        """Keep-mask of the N highest scores in every M consecutive entries along the last dimension
        (its size a multiple of M); ties: the lower index is kept."""
        blocks = scores.reshape(*scores.shape[:-1], scores.shape[-1] // self.m, self.m)
        order = torch.sort(blocks, dim=-1, descending=True, stable=True).indices[..., : self.n]
        keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, order, True)
        return keep.reshape(scores.shape)

    def keep_mask(self, scores: Tensor, kept: Tensor | None, target: Target) -> Tensor:
        """Keep the N best of every M (already pruned entries count as pruned; ties: lower index kept)."""
        s = scores if kept is None else scores.masked_fill(~kept, _NEG_INF)
        keep = self.keep_best(self.to_groups(s, target))
        if kept is not None:
            keep &= self.to_groups(kept, target)
        return self.from_groups(keep, target)


_NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def get_granularity(name: str | Granularity) -> Granularity:
    """A granularity from its name; ``"2:4"``-style strings give an N:M pattern."""
    if isinstance(name, Granularity):
        return name
    if isinstance(name, str):
        match = _NM_PATTERN.match(name)
        if match:
            return NM(int(match.group(1)), int(match.group(2)))
        if name.strip().lower() in ("n:m", "nm"):
            raise ValueError("give the N:M pattern with numbers, e.g. granularity='2:4'")
        if name.strip().lower() == "filter":
            return Channel()
    return GRANULARITIES.get(name)()


def num_to_prune(fraction: float, total: int) -> int:
    """How many of ``total`` a fraction removes (rounded as torch.nn.utils.prune does)."""
    return min(total, int(round(fraction * total)))


def is_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-9)
