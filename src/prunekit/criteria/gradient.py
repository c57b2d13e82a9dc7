"""Gradient-based criteria: first- and second-order estimates of the loss change when a weight goes."""

from __future__ import annotations

from torch import Tensor

from ..statistics import TargetStatistics
from ..targets import Target
from .base import CRITERIA, Criterion, require


# Both average |g| batch by batch: at a converged model the mean gradient nearly cancels out, while
# the per-batch magnitudes still say how much the loss reacts to each weight.


@CRITERIA.register("gradient", "|g|: gradient magnitude, averaged over batches")
class Gradient(Criterion):
    name = "gradient"
    needs = frozenset({"grad_abs"})

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        return require(stats, "grad_abs_sum", self.name, target) / max(stats.count, 1)


@CRITERIA.register("taylor", "|w g|: first-order Taylor estimate of the loss change, averaged over batches (Molchanov et al.)")
class Taylor(Criterion):
    name = "taylor"
    needs = frozenset({"grad_abs"})

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        grad = require(stats, "grad_abs_sum", self.name, target) / max(stats.count, 1)
        return target.value.detach().abs() * grad


@CRITERIA.register("obd", "1/2 h_ii w^2, h_ii from a diagonal empirical Fisher (Optimal Brain Damage, LeCun 1989)")
class OptimalBrainDamage(Criterion):
    name = "obd"
    needs = frozenset({"grad_sq"})

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        fisher = require(stats, "grad_sq_sum", self.name, target) / max(stats.count, 1)
        return 0.5 * fisher * target.value.detach().square()


@CRITERIA.register("movement", "-sum w g over fine-tuning steps: weights moving toward zero go (Sanh et al. 2020)")
class Movement(Criterion):
    name = "movement"
    needs = frozenset({"movement"})
    signed = True

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        return require(stats, "movement", self.name, target).clone()
