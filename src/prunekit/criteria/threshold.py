"""Han et al.'s threshold rule: prune where |w| < q * std(layer), with the ``threshold`` scope.

Han, Pool, Tran & Dally (2015) prune every weight whose magnitude is below a quality parameter ``q``
times the standard deviation of its layer's weights. Here that is two pieces that also work apart:

* the criterion ``han`` scores ``|w| / (q * std(layer))`` (std over the layer's kept weights), so the rule
  is "prune where the score is below 1";
* the scope ``threshold`` prunes every group whose score is below a cut (1 by default) and nothing else:
  the sparsity follows from the rule and is not given.

    pk.prune(model, method="han", scope="threshold")                       # q = 1
    pk.prune(model, method=HanThreshold(quality=0.7), scope="threshold")

Under a ``Pruner`` the schedule then only says *when* to prune (Han's prune / retrain cycles): each
prune step re-applies the rule to the weights left, and the schedule's sparsity is not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..scope import SCOPES, Cut, LayerScores, Scope, cap_count, kth_cut
from ..statistics import TargetStatistics
from ..targets import Target
from .base import CRITERIA, Criterion

__all__ = ["HanThreshold", "Threshold"]


@CRITERIA.register("han", "|w| / (q std(layer)), q = 1: Han et al. 2015 prune where it is < 1 (scope='threshold')")
class HanThreshold(Criterion):
    """``|w| / (quality * std(layer))``; with ``scope="threshold"`` exactly Han et al.'s rule
    ``|w| < quality * std``. The std is that of the layer's weights still kept (all of them at first)."""

    def __init__(self, quality: float = 1.0) -> None:
        if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not quality > 0:
            raise ValueError(f"quality must be a positive number, got {quality!r}")
        self.quality = float(quality)

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        value = target.value.detach()
        kept = value != 0
        live = value[kept] if bool(kept.any()) else value.reshape(-1)
        std = live.float().std(unbiased=False) if live.numel() > 1 else torch.tensor(0.0)
        if not std > 0:
            return torch.full_like(value, torch.inf)  # a constant layer has no spread to cut below
        return value.abs() / (self.quality * std.to(value.dtype))

    def __repr__(self) -> str:
        return f"HanThreshold(quality={self.quality:g})"


@SCOPES.register("threshold", "prune every score below 1 (with method 'han': |w| < q std, Han et al. 2015); no sparsity")
class Threshold(Scope):
    """Prune every group whose score is below ``cut``; the sparsity argument is not used (it follows from
    the rule). ``max_layer_sparsity`` still caps each layer (the lowest scores go first)."""

    sets_sparsity = True

    def __init__(self, cut: float = 1.0) -> None:
        self.cut = float(cut)

    def cuts(self, layers: Sequence[LayerScores], sparsity: float | None, cap: float | None) -> list[Cut]:
        out = []
        for layer in layers:
            below = int((layer.scores().reshape(-1) < self.cut).sum())
            out.append(kth_cut([layer], min(below, cap_count(cap, layer.num_groups)))[0])
        return out
