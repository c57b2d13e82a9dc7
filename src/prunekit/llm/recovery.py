"""Recovery without training data: a few steps of layer-wise least squares on the calibration inputs, mask kept.

After a layer method chose its mask (and, for SparseGPT, its own weight update), the kept weights ``W'``
of every output row are refined to reduce ``||(W - W') X||^2`` over the calibration inputs ``X`` of that
layer, ``W`` being the layer's weights before pruning. With ``H = 2 X X^T / n`` (the SparseGPT Hessian,
slightly dampened) the problem is a quadratic per row on the kept entries; ``steps`` iterations of
conjugate gradients, run on all rows at once (one ``(out, in) @ (in, in)`` product per step), minimise
it. Pruned entries stay exactly zero. Wanda gains the reconstruction it lacks; SparseGPT, whose sweep
solves the same problem greedily, gains the rest of the way to the optimum on its mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .methods import LayerMethod, LayerResult
from .sparsegpt import Hessian

__all__ = ["RECOVERIES", "least_squares_refine", "Recovered"]

RECOVERIES = (None, "lsq")


def least_squares_refine(dense: Tensor, start: Tensor, keep: Tensor, H: Tensor, steps: int = 10,
                         percdamp: float = 0.01) -> tuple[Tensor, float, float]:
    """Minimise ``(W - W') (H + damp I) (W - W')^T`` per row over ``W'`` with ``W' = 0`` where ``keep`` is False.

    ``dense``: ``W`` ``(out, in)``; ``start``: the pruned weights to begin from. Returns ``(W', error before,
    error after)``, the errors summed over rows with the undampened ``H`` (float64 arithmetic inside).
    """
    H = H.to(torch.float64)
    W = dense.to(torch.float64)
    K = keep.to(torch.float64)
    X = start.to(torch.float64) * K
    damp = percdamp * float(torch.diag(H).mean()) if H.numel() else 0.0
    Hd = H.clone()
    Hd.diagonal().add_(damp)

    def error(V: Tensor) -> float:
        D = W - V
        return float(((D @ H) * D).sum())

    before = error(X)
    R = ((W - X) @ Hd) * K  # minus half the gradient, on the kept entries
    P = R.clone()
    rs = (R * R).sum(dim=1)
    for _ in range(steps):
        AP = (P @ Hd) * K
        curv = (P * AP).sum(dim=1)
        alpha = torch.where(curv > 0, rs / curv.clamp_min(1e-300), torch.zeros_like(rs))
        X += alpha[:, None] * P
        R -= alpha[:, None] * AP
        rs_new = (R * R).sum(dim=1)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        P = R + beta[:, None] * P
        rs = rs_new
    after = error(X)
    if not after <= before:  # never worse than the method's own weights
        return start.to(dense.dtype) * keep, before, before
    return X.to(dense.dtype), before, after


class _Pair:
    """The inner method's statistics plus a Hessian, both fed every batch."""

    def __init__(self, inner, hessian: Hessian | None) -> None:
        self.inner, self.hessian = inner, hessian

    def add(self, x: Tensor) -> None:
        self.inner.add(x)
        if self.hessian is not None:
            self.hessian.add(x)

    @property
    def H(self) -> Tensor:
        return (self.hessian or self.inner).H


class Recovered(LayerMethod):
    """``inner`` followed by :func:`least_squares_refine` on every layer (same masks as ``inner``)."""

    def __init__(self, inner: LayerMethod, steps: int = 10) -> None:
        if not inner.needs_data:
            raise ValueError(f"recovery needs calibration statistics; method {inner.name!r} uses none")
        if not (isinstance(steps, int) and steps > 0):
            raise ValueError(f"recovery_steps must be a positive integer, got {steps!r}")
        self.inner, self.steps = inner, steps
        self.name = inner.name
        self.unstructured_scope = inner.unstructured_scope

    def statistics(self, in_features, device):
        inner = self.inner.statistics(in_features, device)
        return _Pair(inner, None if isinstance(inner, Hessian) else Hessian(in_features, device))

    def prune(self, weight, stats, sparsity, pattern, kept):
        result = self.inner.prune(weight, stats.inner, sparsity, pattern, kept)
        start = weight if result.weight is None else result.weight
        new, before, after = least_squares_refine(weight, start, result.keep, stats.H, self.steps)
        return LayerResult(result.keep, new, after / 2)  # ||(W - W') X||^2 / n, SparseGPT's own error scale
