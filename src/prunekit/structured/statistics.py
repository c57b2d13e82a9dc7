"""Activation statistics of channels, collected once with forward hooks over calibration batches.

A *tap* is a layer's input dimension that reads channels (the dependency graph records one wherever a
Linear, a convolution or an attention layer reads a group's channels). A forward pre-hook on each
tapped layer accumulates, per index of that dimension: the mean absolute value, the fraction of exact
zeros (APoZ), and, when asked, one value per sample (the mean over every other dimension, i.e. global
average pooling for feature maps) for entropy, LDA and correlation criteria. The model runs in eval
mode without gradients; every module gets its mode back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from ..statistics import move_to

__all__ = ["TapStatistics", "collect_activation_statistics", "split_batch"]


@dataclass
class TapStatistics:
    """Running statistics of one tapped dimension (``n`` indices)."""

    rows: int = 0
    abs_sum: Tensor | None = None
    zeros: Tensor | None = None
    samples: list[Tensor] = field(default_factory=list)  # (batch, n) per batch
    labels: list[Tensor] = field(default_factory=list)

    @property
    def mean_abs(self) -> Tensor:
        return self.abs_sum / max(self.rows, 1)

    @property
    def apoz(self) -> Tensor:
        """Average percentage of zeros (Hu et al. 2016), in [0, 1]."""
        return self.zeros / max(self.rows, 1)

    def per_sample(self) -> Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0)

    def sample_labels(self) -> Tensor:
        return torch.cat(self.labels) if self.labels else torch.empty(0, dtype=torch.long)


def split_batch(batch: Any) -> tuple[tuple, dict, Tensor | None]:
    """(args, kwargs, labels) of a calibration batch: ``(inputs, labels)``, a tensor, or a dict."""
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        labels = kwargs.pop("labels", None)
        return (), kwargs, labels
    if isinstance(batch, Tensor):
        return (batch,), {}, None
    if isinstance(batch, Sequence) and len(batch) == 2:
        inputs, labels = batch
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return args, {}, labels if isinstance(labels, Tensor) else None
    raise TypeError(f"a calibration batch must be (inputs, labels), a tensor or a dict, got {type(batch).__name__}")


def collect_activation_statistics(
    model: nn.Module,
    taps: Sequence[tuple[str, int]],
    data: Iterable,
    *,
    per_sample: bool = False,
    max_batches: int | None = None,
) -> dict[tuple[str, int], TapStatistics]:
    """Statistics of the first input of each ``(module name, dim)`` in ``taps`` over ``data``."""
    modules = dict(model.named_modules())
    stats = {tap: TapStatistics() for tap in taps}
    by_module: dict[str, list[int]] = {}
    for name, dim in taps:
        if name not in modules:
            raise ValueError(f"no module {name!r} to collect activations from")
        by_module.setdefault(name, []).append(dim)
    current_labels: list[Tensor | None] = [None]

    def make_hook(name: str):
        def hook(module, args):
            if not args or not isinstance(args[0], Tensor):
                return
            x = args[0].detach()
            for dim in by_module[name]:
                s = stats[(name, dim)]
                d = dim % x.ndim
                n = x.shape[d]
                moved = x.movedim(d, -1)
                rows = moved.reshape(-1, n).float()
                abs_sum = rows.abs().sum(0).cpu()  # labels and scores live on the CPU
                zeros = (rows == 0).sum(0).float().cpu()
                s.abs_sum = abs_sum if s.abs_sum is None else s.abs_sum + abs_sum
                s.zeros = zeros if s.zeros is None else s.zeros + zeros
                s.rows += rows.shape[0]
                if per_sample and x.ndim >= 2 and d != 0:
                    s.samples.append(moved.reshape(x.shape[0], -1, n).float().mean(1).cpu())
                    if current_labels[0] is not None:
                        s.labels.append(current_labels[0].reshape(-1).cpu())

        return hook

    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in by_module]
    modes = [(m, m.training) for m in model.modules()]
    device = next(iter(model.parameters()), torch.empty(0)).device
    model.eval()
    try:
        seen = 0
        with torch.no_grad():
            for batch in islice(data, max_batches):
                args, kwargs, labels = split_batch(batch)
                current_labels[0] = labels
                model(*move_to(args, device), **move_to(kwargs, device))
                seen += 1
        if seen == 0:
            raise ValueError("the calibration data yielded no batch")
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return stats
