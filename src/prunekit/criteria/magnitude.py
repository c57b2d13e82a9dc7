"""Data-free criteria: weight magnitude and random scores."""

from __future__ import annotations

import torch
from torch import Tensor

from ..statistics import TargetStatistics
from ..targets import Target
from .base import CRITERIA, Criterion


@CRITERIA.register("magnitude", "|w|: smallest weights go first (Han et al. 2015); group norms via group_norm")
class Magnitude(Criterion):
    """``|w|``: the weight's magnitude."""

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        return target.value.detach().abs()


@CRITERIA.register("random", "uniform random scores, seeded: the baseline every method must beat")
class Random(Criterion):
    """Uniform random scores, the same for the same seed and layer."""

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        # One generator per (seed, layer) so the same call always draws the same scores, in any pass.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        scores = torch.rand(target.shape, generator=generator)
        return scores.to(target.parameter.device)
