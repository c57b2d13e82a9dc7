"""Gradient-based criteria: first- and second-order estimates of the loss change when a weight goes."""

from __future__ import annotations

from torch import Tensor

from ..statistics import TargetStatistics
from ..targets import Target
from .base import CRITERIA, Criterion, require


# Every batch statistic is averaged over batches of |g| or g^2, never of g itself: at a converged model the
# mean gradient nearly cancels out, while the per-batch magnitudes still say how much the loss reacts.


@CRITERIA.register("grad_abs", "|g|: gradient magnitude alone, mean over batches (was 'gradient')")
class GradAbs(Criterion):
    """``mean_b |g_b|``: how strongly the loss reacts to the weight, whatever its value."""

    needs = frozenset({"grad_abs"})

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        return require(stats, "grad_abs_sum", self.name, target) / max(stats.count, 1)


@CRITERIA.register("weight_grad_abs", "|w g|, mean over batches: the seeds' 'gradient magnitude pruning'")
class WeightGradAbs(Criterion):
    """``mean_b |w g_b|``: the L1 norm of weight times gradient (the seeds' "gradient magnitude pruning";
    for one batch it ranks as ``taylor`` does)."""

    needs = frozenset({"grad_abs"})

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        grad = require(stats, "grad_abs_sum", self.name, target) / max(stats.count, 1)
        return target.value.detach().abs() * grad


@CRITERIA.register("taylor", "(w g)^2, mean over batches: first-order Taylor importance (Molchanov et al. 2019)")
class Taylor(Criterion):
    """First-order Taylor importance (Molchanov et al. 2019, eq. 3): ``I = (g w)^2``, the squared first-order
    loss change when ``w`` is zeroed, averaged over batches: ``w^2 mean_b g_b^2``. ``pk.structured``'s
    ``taylor`` is the same saliency for a channel, ``(sum over its weights of w g)^2``."""

    needs = frozenset({"grad_sq"})

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        grad_sq = require(stats, "grad_sq_sum", self.name, target) / max(stats.count, 1)
        return target.value.detach().square() * grad_sq


CRITERIA.alias("gradient", "grad_abs")


@CRITERIA.register("obd", "1/2 h_ii w^2, h_ii = per-sample empirical Fisher diagonal (Optimal Brain Damage, LeCun et al. 1989)")
class OptimalBrainDamage(Criterion):
    """Saliency ``s_i = 1/2 h_ii w_i^2`` (LeCun et al. 1989). The Hessian diagonal ``h_ii`` is estimated by
    the diagonal empirical Fisher ``(1/N) sum_n (dl_n/dw_i)^2`` over the N calibration samples (per-sample
    gradients, so any batching of the same samples gives the same scores). At a minimum of a model whose
    predictive distribution matches the labels, the Fisher equals the Hessian (LeCun used a Gauss-Newton
    diagonal computed by back-propagation; both drop the second-derivative-of-the-network term)."""

    needs = frozenset({"fisher"})

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        require(stats, "fisher_sum", self.name, target)
        return 0.5 * stats.fisher_diag * target.value.detach().square()


@CRITERIA.register("movement", "-sum w g over fine-tuning steps: weights moving toward zero go (Sanh et al. 2020)")
class Movement(Criterion):
    needs = frozenset({"movement"})
    signed = True

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        return require(stats, "movement", self.name, target).clone()
