"""Sparsity-inducing penalties: L1, L2, elastic net, group lasso and sparse group lasso.

Each is a callable returning a scalar to add to the loss, with an optional proximal step, and prunes by
threshold after training:

    penalty = GroupLasso(model, strength=1e-3, groups="channel")
    loss = F.cross_entropy(model(x), y) + penalty()       # (sub)gradient descent on the penalty, or ...
    optimizer.step(); penalty.proximal_step(lr)           # ... proximal gradient: exact zeros (use one)
    penalty.prune(threshold=1e-3)                         # after training: masks on what is (nearly) zero

``strength`` is lambda. With the penalty in the loss, do not also call ``proximal_step`` (that would
apply it twice). Penalties see the weights as the forward pass does, so masked entries contribute
nothing. Groups come from the granularities: ``"channel"`` (alias ``"neuron"``/``"filter"``: a Linear's
output neurons, a conv's filters), ``"column"`` (input neurons / input channels), ``"kernel"``,
``"vector"``.

Formulas (w: a target's weights, g: a group of size p_g, S_t(x) = sign(x) max(|x| - t, 0)):

=====================  ==========================================================  =====================================================
penalty                value / lambda                                              proximal step with t = lr * lambda
=====================  ==========================================================  =====================================================
``l1``                 sum |w|                                                     S_t(w)
``l2``                 1/2 sum w^2                                                 w / (1 + t)
``elastic_net``        a sum |w| + (1 - a)/2 sum w^2    (a = ``l1_ratio``)          S_{t a}(w) / (1 + t (1 - a))
``group_lasso``        sum_g sqrt(p_g) ||w_g||_2                                   w_g max(0, 1 - t sqrt(p_g) / ||w_g||)
``sparse_group_lasso`` a sum |w| + (1 - a) sum_g sqrt(p_g) ||w_g||_2               the group step of S_{t a}(w) with t (1 - a)
=====================  ==========================================================  =====================================================

``size_weighted=False`` drops the sqrt(p_g) factors (Yuan & Lin 2006 and Simon et al. 2013 use them).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from ..granularity import NM, Granularity, get_granularity
from ..modules import fraction_pruned
from ..pruning import LayerReport, PruneReport
from ..registry import Registry
from ..scope import warn_emptied
from ..targets import Target, resolve_targets
from ._wrap import attach_masks

__all__ = [
    "Penalty",
    "L1",
    "L2",
    "ElasticNet",
    "GroupLasso",
    "SparseGroupLasso",
    "PENALTIES",
    "get_penalty",
    "soft_threshold",
]

_GROUP_ALIASES = {"neuron": "channel", "neurons": "channel", "channels": "channel", "filters": "channel"}


def soft_threshold(x: Tensor, t: float | Tensor) -> Tensor:
    """S_t(x) = sign(x) * max(|x| - t, 0)."""
    return x.sign() * (x.abs() - t).clamp_min(0)


def _check_nonnegative(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{what} must be a number >= 0, got {value!r}")
    return float(value)


def _check_ratio(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"l1_ratio must be in [0, 1], got {value!r}")
    return float(value)


class Penalty:
    """Base class: ``strength * sum over targets of term(w)``.

    Args:
        model: the network (DDP-wrapped or not).
        strength: lambda, >= 0.
        targets, exclude: as in ``prunekit.prune`` (default: every Linear and conv weight).
    """

    name = ""
    grouped = False

    def __init__(
        self,
        model: nn.Module,
        strength: float = 1e-4,
        *,
        targets: Iterable[str | type[nn.Module]] | str | None = None,
        exclude: Iterable[str] | str = (),
    ) -> None:
        self.model = unwrap(model)
        self.strength = _check_nonnegative(strength, "strength")
        self.targets: list[Target] = resolve_targets(self.model, targets, exclude)

    def term(self, weight: Tensor, target: Target) -> Tensor:
        """The penalty of one weight tensor, without ``strength``."""
        raise NotImplementedError

    def prox(self, weight: Tensor, t: float, target: Target) -> Tensor:
        """The proximal operator of ``t * term`` applied to ``weight``."""
        raise NotImplementedError

    def __call__(self) -> Tensor:
        """``strength * sum of terms``: a scalar tensor to add to the loss."""
        total = sum(self.term(t.value, t) for t in self.targets)
        return self.strength * total

    def proximal_step(self, lr: float) -> None:
        """One proximal step with step size ``lr * strength``; call it after ``optimizer.step()``."""
        t = _check_nonnegative(lr, "lr") * self.strength
        with torch.no_grad():
            for target in self.targets:
                param = target.parameter
                mask = target.mask(self.model)
                new = self.prox(param.detach(), t, target)
                param.copy_(new if mask is None else new * mask)

    def magnitudes(self, target: Target) -> Tensor:
        """What ``prune`` compares with the threshold: |w| (per element), or the group norms."""
        return target.value.detach().abs()

    def keep_mask(self, target: Target, threshold: float) -> Tensor:
        return self.magnitudes(target) > threshold

    def prune(self, threshold: float = 0.0) -> PruneReport:
        """Mask every weight (or group, for group penalties) whose magnitude (or L2 norm) is at most
        ``threshold``; masks only tighten. Returns a report like ``prunekit.prune``'s."""
        threshold = _check_nonnegative(threshold, "threshold")
        rows = []
        with torch.no_grad():
            keeps = {t.name: self.keep_mask(t, threshold) for t in self.targets}
            old = {t.name: t.mask(self.model) for t in self.targets}
            new = attach_masks(self.model, keeps, self.targets)
            for target in self.targets:
                before, after = fraction_pruned(old[target.name]), fraction_pruned(new[target.name])
                rows.append(LayerReport(target.name, target.shape, target.numel(), before, after))
        warn_emptied([(r.name, r.sparsity_after) for r in rows])
        granularity = self.granularity.name if self.grouped else "element"
        return PruneReport(f"{self.name} threshold {threshold:g}", granularity, "threshold", None, rows)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength}, targets={len(self.targets)})"


PENALTIES: Registry[type[Penalty]] = Registry("penalty")


@PENALTIES.register("l1", "lambda sum |w|; prox: soft threshold")
class L1(Penalty):
    """``sum |w|``; its proximal step is the soft threshold."""

    def term(self, weight, target):
        return weight.abs().sum()

    def prox(self, weight, t, target):
        return soft_threshold(weight, t)


@PENALTIES.register("l2", "lambda/2 sum w^2; prox: shrink by 1/(1 + t)")
class L2(Penalty):
    """``1/2 sum w^2`` (weight decay); its proximal step shrinks by ``1 / (1 + t)``."""

    def term(self, weight, target):
        return 0.5 * weight.square().sum()

    def prox(self, weight, t, target):
        return weight / (1.0 + t)


@PENALTIES.register("elastic_net", "a L1 + (1 - a) L2 (Zou & Hastie 2005)")
class ElasticNet(Penalty):
    """``a * L1 + (1 - a) * L2`` with ``a = l1_ratio`` (Zou & Hastie 2005)."""

    def __init__(self, model, strength=1e-4, *, l1_ratio: float = 0.5, targets=None, exclude=()) -> None:
        self.l1_ratio = _check_ratio(l1_ratio)
        super().__init__(model, strength, targets=targets, exclude=exclude)

    def term(self, weight, target):
        a = self.l1_ratio
        return a * weight.abs().sum() + (1.0 - a) * 0.5 * weight.square().sum()

    def prox(self, weight, t, target):
        a = self.l1_ratio
        return soft_threshold(weight, t * a) / (1.0 + t * (1.0 - a))


@PENALTIES.register("group_lasso", "sum_g sqrt(p_g) ||w_g||_2 over neurons/channels (Yuan & Lin 2006, Wen et al. 2016)")
class GroupLasso(Penalty):
    """Sum over groups of sqrt(group size) * L2 norm (Yuan & Lin 2006; Wen et al. 2016 for channels)."""

    grouped = True

    def __init__(
        self, model, strength=1e-4, *, groups: str | Granularity = "channel", size_weighted: bool = True,
        targets=None, exclude=(),
    ) -> None:
        key = _GROUP_ALIASES.get(groups.strip().lower(), groups) if isinstance(groups, str) else groups
        self.granularity = get_granularity(key)
        if isinstance(self.granularity, NM) or self.granularity.name == "element":
            raise ValueError(
                f"groups must be 'channel' (or 'neuron'), 'column', 'kernel' or 'vector', got {groups!r}"
            )
        self.size_weighted = bool(size_weighted)
        super().__init__(model, strength, targets=targets, exclude=exclude)
        for target in self.targets:
            self.granularity.check(target)

    def _weights(self, target: Target) -> float:
        return float(target.numel() // self.granularity.num_groups(target)) ** 0.5 if self.size_weighted else 1.0

    def _norms(self, weight: Tensor, target: Target) -> Tensor:
        return torch.linalg.vector_norm(self.granularity.to_groups(weight, target), dim=1)

    def term(self, weight, target):
        return self._weights(target) * self._norms(weight, target).sum()

    def _group_shrink(self, weight: Tensor, t: float, target: Target) -> Tensor:
        groups = self.granularity.to_groups(weight, target)
        norms = torch.linalg.vector_norm(groups, dim=1, keepdim=True)
        factor = (1.0 - t * self._weights(target) / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min(0)
        return self.granularity.from_groups(groups * factor, target)

    def prox(self, weight, t, target):
        return self._group_shrink(weight, t, target)

    def magnitudes(self, target):
        norms = self._norms(target.value.detach(), target)
        groups = self.granularity.to_groups(torch.empty(target.shape, device=norms.device), target)
        return self.granularity.from_groups(norms[:, None].expand_as(groups), target)


@PENALTIES.register("sparse_group_lasso", "a L1 + (1 - a) group lasso (Simon et al. 2013)")
class SparseGroupLasso(GroupLasso):
    """``a * L1 + (1 - a) * group lasso`` (Simon et al. 2013; Scardapane et al. 2017): whole groups go
    and, within the groups that stay, single weights too. ``prune`` masks both."""

    def __init__(
        self, model, strength=1e-4, *, l1_ratio: float = 0.5, groups="channel", size_weighted=True,
        targets=None, exclude=(),
    ) -> None:
        self.l1_ratio = _check_ratio(l1_ratio)
        super().__init__(model, strength, groups=groups, size_weighted=size_weighted, targets=targets, exclude=exclude)

    def term(self, weight, target):
        a = self.l1_ratio
        return a * weight.abs().sum() + (1.0 - a) * super().term(weight, target)

    def prox(self, weight, t, target):
        a = self.l1_ratio
        return self._group_shrink(soft_threshold(weight, t * a), t * (1.0 - a), target)

    def keep_mask(self, target, threshold):
        return super().keep_mask(target, threshold) & (target.value.detach().abs() > threshold)


def get_penalty(name: str, model: nn.Module, **kwargs) -> Penalty:
    """A penalty from its registered name: ``get_penalty("group_lasso", model, strength=1e-3)``."""
    cls = PENALTIES.get(name)
    try:
        return cls(model, **kwargs)
    except TypeError as error:
        raise TypeError(f"penalty {name!r}: {error}") from None
