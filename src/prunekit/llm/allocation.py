"""Non-uniform sparsity across blocks: OWL's outlier-weighted allocation and a sensitivity-based one.

Both run the *dense* model once, block by block, on the calibration data, score every block from the
Wanda scores ``|W_ij| * ||X_j||_2`` of its layers, and turn the scores into per-block sparsities that
average (weighted by the blocks' prunable weights) to the target:

* ``"owl"`` (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity", arXiv:2310.05175): a block's score is
  its outlier ratio, the fraction of its scores above ``M`` times their mean (``M`` = ``outlier_threshold``,
  5 in the paper). Blocks with more outliers are pruned less.
* ``"sensitivity"``: a block's score is the relative error of its output,
  ``||B'(x) - B(x)||^2 / ||B(x)||^2`` on the calibration inputs, when its layers get Wanda's mask at the
  target sparsity (applied for that one pass, then restored). Blocks that lose more are pruned less.

The scores map linearly onto densities in ``[1 - S - lambda, 1 - S + lambda]`` (OWL's rule: min-max
scaled to width ``2 lambda``, then shifted so the mean density is ``1 - S``); ``lambda`` is
``allocation_range`` (OWL's 0.08 by default).

The scoring pass also runs on a model whose blocks are on the ``meta`` device (``pk.llm.prune_from_disk``):
a read-only block source loads each block from disk before it runs and frees it after, writing nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import masking
from .blocks import BlockLayer, matrix_to_weight, weight_matrix
from .sequential import BlockInputs, BlockSource, InMemory, collect_statistics, enter_blocks, run_block
from .wanda import Wanda, wanda_mask, wanda_scores

__all__ = ["ALLOCATIONS", "outlier_ratio", "scores_to_sparsities", "block_scores", "allocate"]

ALLOCATIONS = ("uniform", "owl", "sensitivity")


def outlier_ratio(scores: Sequence[Tensor], threshold: float = 5.0) -> float:
    """OWL's layer outlier ratio: the fraction of all ``scores`` above ``threshold`` times their mean.

    ``scores`` is read twice, one tensor at a time (the mean, then the count) and never concatenated, so
    a lazy sequence (:class:`_LayerScores`) holds one layer's scores at a time."""
    total, count = 0.0, 0
    for s in scores:
        total += float(s.sum(dtype=torch.float64))
        count += s.numel()
    limit = threshold * total / count
    return sum(int((s > limit).sum()) for s in scores) / count


class _LayerScores(Sequence):
    """Wanda's scores of a block's layers, computed each time one is indexed (one layer's in memory at a time)."""

    def __init__(self, layers: Sequence[BlockLayer], stats: Mapping) -> None:
        self.layers, self.stats = layers, stats

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Tensor:
        layer = self.layers[index]  # an IndexError ends iteration
        return wanda_scores(weight_matrix(layer), self.stats[layer.name].norms)


def scores_to_sparsities(scores: Sequence[float], sparsity: float, lam: float,
                         weights: Sequence[float] | None = None) -> list[float]:
    """Per-block sparsities: higher score, lower sparsity; densities span ``2 lam`` and their mean (weighted by
    ``weights``, the blocks' prunable weight counts) is ``1 - sparsity``."""
    r = torch.tensor(scores, dtype=torch.float64)
    w = torch.ones_like(r) if weights is None else torch.tensor(weights, dtype=torch.float64)
    spread = float(r.max() - r.min())
    density = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    density = density - (density * w).sum() / w.sum() + (1 - sparsity)
    out = (1 - density).tolist()
    bad = [x for x in out if not 0 <= x < 1]
    if bad:
        raise ValueError(
            f"allocation_range={lam:g} around sparsity {sparsity:g} gives a block sparsity of {bad[0]:.3f}, "
            "outside [0, 1); use a smaller allocation_range"
        )
    return out


def _prune_temporarily(layers: Sequence[BlockLayer], stats: Mapping, sparsity: float) -> list[tuple[Tensor, Tensor]]:
    """Zero each layer's Wanda-pruned weights in place; returns ``(parameter, saved values)`` to restore."""
    saved = []
    for layer in layers:
        param = masking.raw_parameter(layer.module, "weight")
        keep = wanda_mask(weight_matrix(layer), stats[layer.name].norms, sparsity)
        saved.append((param, param.detach().clone()))
        param.data.mul_(matrix_to_weight(layer, keep).to(param.dtype))
    return saved


def _relative_error(block: nn.Module, layers: Sequence[BlockLayer], stats: Mapping, sparsity: float,
                    inputs: BlockInputs, index: int, dense: Sequence[Tensor]) -> float:
    """``||B'(x) - B(x)||^2 / ||B(x)||^2`` over the batches, ``B'`` the block with Wanda's masks (then restored)."""
    saved = _prune_temporarily(layers, stats, sparsity)
    try:
        err = ref = 0.0
        for b in range(len(inputs.hidden)):
            pruned = run_block(block, inputs, index, b)
            err += float((pruned - dense[b]).to(torch.float64).square().sum())
            ref += float(dense[b].to(torch.float64).square().sum())
    finally:
        for param, value in saved:
            param.data.copy_(value)
    return err / ref if ref > 0 else 0.0


@torch.no_grad()
def block_scores(model: nn.Module, blocks: nn.ModuleList, layers: Sequence[Sequence[BlockLayer]],
                 batches: Sequence[Mapping], sparsity: float, threshold: float = 5.0,
                 source: BlockSource | None = None,
                 kinds: Collection[str] = ("owl", "sensitivity")) -> dict[str, list[float]]:
    """``{"owl": outlier ratios, "sensitivity": relative output errors}``, one per block, from a pass of the
    dense model (plus, for ``"sensitivity"``, one pass of each block with Wanda's mask at ``sparsity``,
    restored afterwards). ``kinds``: the scores to compute (the others are skipped, with their cost).

    ``source`` (a read-only :class:`~prunekit.llm.sequential.BlockSource`, for blocks on the ``meta`` device)
    loads block ``i`` before it is used and frees it once its outputs are computed, as the pruning pass does:
    one block in memory at a time."""
    source = InMemory() if source is None else source
    inputs = enter_blocks(model, blocks, batches, source)
    out: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i, block in enumerate(blocks):
        if i:
            source.load(i)
        dense = [run_block(block, inputs, i, b).detach() for b in range(len(inputs.hidden))]
        if not layers[i]:
            for kind in kinds:
                out[kind].append(0.0)
        else:
            stats, _ = collect_statistics(block, layers[i], Wanda(), inputs, i)
            if "owl" in out:
                out["owl"].append(outlier_ratio(_LayerScores(layers[i], stats), threshold))
            if "sensitivity" in out:
                out["sensitivity"].append(_relative_error(block, layers[i], stats, sparsity, inputs, i, dense))
        inputs.hidden = dense
        source.release(i)
    return out


def allocate(model: nn.Module, blocks: nn.ModuleList, layers: Sequence[Sequence[BlockLayer]],
             batches: Sequence[Mapping], allocation: str, sparsity: float, lam: float = 0.08,
             threshold: float = 5.0, source: BlockSource | None = None) -> list[float]:
    """One sparsity per block for ``allocation`` (``"owl"`` or ``"sensitivity"``), averaging to ``sparsity``;
    ``source``: see :func:`block_scores`."""
    scores = block_scores(model, blocks, layers, batches, sparsity, threshold, source, (allocation,))[allocation]
    weights = [sum(layer.in_features * layer.out_features for layer in block) for block in layers]
    pruned = [(s, w) for s, w in zip(scores, weights) if w]
    result = iter(scores_to_sparsities([s for s, _ in pruned], sparsity, lam, [w for _, w in pruned]))
    return [next(result) if w else sparsity for w in weights]
