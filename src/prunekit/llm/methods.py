"""Layer-wise one-shot pruning methods for LLMs: what each one needs and how it prunes one layer.

A method sees one layer at a time, as an ``(out, in)`` float32 weight matrix, plus the statistics of
that layer's inputs collected over calibration tokens, and returns a keep-mask (``True`` = kept) and,
for methods that reconstruct, new values for the remaining weights. ``prunekit.llm.prune`` feeds them
block by block (see ``sequential.py``).

Methods are registered in :data:`LLM_METHODS` by name: ``magnitude`` (here), ``wanda`` and ``sparsegpt``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from ..granularity import NM, get_granularity, num_to_prune
from ..registry import Registry

__all__ = [
    "LayerMethod",
    "LayerResult",
    "Accumulator",
    "LLM_METHODS",
    "get_method",
    "parse_pattern",
    "lowest_k_keep",
    "Magnitude",
]

_NEG_INF = float("-inf")


class Accumulator(Protocol):
    """Running statistics of a layer's inputs; ``add`` receives ``(tokens, in_features)``."""

    def add(self, x: Tensor) -> None: ...


@dataclass
class LayerResult:
    """A pruned layer: the keep-mask and, for reconstructing methods, the new ``(out, in)`` weights."""

    keep: Tensor
    weight: Tensor | None = None
    error: float | None = None  # the method's own estimate of the added loss, when it has one


class LayerMethod:
    """Base class of the layer-wise methods. ``needs_data``: whether calibration inputs are used."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True
    #: how the sparsity is distributed for unstructured pruning ("per layer", "per row", ...)
    unstructured_scope: ClassVar[str] = "per layer"

    def statistics(self, in_features: int, device: torch.device) -> Accumulator | None:
        """A fresh accumulator for one layer's inputs (``None`` when the method needs none)."""
        return None

    def prune(
        self, weight: Tensor, stats: Accumulator | None, sparsity: float, pattern: NM | None, kept: Tensor | None
    ) -> LayerResult:
        """Prune one ``(out, in)`` float32 matrix. ``kept`` is the existing mask (entries already pruned stay
        pruned); ``pattern`` an N:M pattern along the input dimension, or ``None`` for unstructured."""
        raise NotImplementedError

    def prune_group(
        self, weights: list[Tensor], stats: Accumulator | None, sparsity: float, pattern: NM | None,
        kept: list[Tensor | None],
    ) -> list[LayerResult]:
        """Prune layers that read the same inputs (one shared accumulator), e.g. q/k/v. The default prunes them
        one by one; a method may share work between them, with the same results."""
        return [self.prune(w, stats, sparsity, pattern, k) for w, k in zip(weights, kept)]


LLM_METHODS: Registry[type[LayerMethod]] = Registry("llm method")


def get_method(name: str | LayerMethod, **options) -> LayerMethod:
    """A method instance from its name; unknown options raise ``ValueError`` naming them."""
    if isinstance(name, LayerMethod):
        if options:
            raise ValueError("options go to the method's constructor; pass them there, not to prune()")
        return name
    cls = LLM_METHODS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        known = f"its options: {', '.join(accepted)}" if accepted else "it takes no options"
        raise ValueError(f"llm method {name!r} has no option {unknown[0]!r} ({known})")
    return cls(**options)


def parse_pattern(pattern: str | NM | None) -> NM | None:
    """``"2:4"`` -> ``NM(2, 4)``; ``None`` stays ``None``."""
    if pattern is None or isinstance(pattern, NM):
        return pattern
    gran = get_granularity(pattern) if isinstance(pattern, str) and ":" in pattern else None
    if not isinstance(gran, NM):
        raise ValueError(f"pattern must be an N:M string such as '2:4' or '4:8', got {pattern!r}")
    return gran


def lowest_k_keep(scores: Tensor, k: int, dim: int | None = None) -> Tensor:
    """Prune exactly the ``k`` lowest scores (of the whole matrix, or along ``dim`` in every slice)."""
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    if dim is None:
        idx = torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices
        keep.view(-1)[idx] = False
    else:
        idx = torch.topk(scores, k, dim=dim, largest=False, sorted=False).indices
        keep.scatter_(dim, idx, False)
    return keep


def masked_scores(scores: Tensor, kept: Tensor | None) -> Tensor:
    """Entries already pruned score ``-inf``: they are the first to go and never come back."""
    return scores if kept is None else scores.masked_fill(~kept, _NEG_INF)


@LLM_METHODS.register("magnitude", "|w| within each layer (or each N:M group): the data-free baseline")
class Magnitude(LayerMethod):
    """Layer-wise magnitude pruning: the ``round(s * numel)`` smallest ``|w|`` of each layer go."""

    needs_data = False

    def prune(self, weight, stats, sparsity, pattern, kept):
        scores = masked_scores(weight.abs(), kept)
        if pattern is not None:
            keep = pattern.keep_best(scores)
        else:
            keep = lowest_k_keep(scores, num_to_prune(sparsity, scores.numel()))
        return LayerResult(keep if kept is None else keep & kept)
