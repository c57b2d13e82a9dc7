"""Learned masks: trainable scores binarised with a straight-through estimator (Sanh et al. 2020).

Each target weight W gets a score matrix S of its shape. The forward pass uses W * M(S), where M binarises
the scores; the backward pass treats M as the identity (straight-through), so dL/dS = dL/dW' * W: scores
grow for weights moving away from zero and shrink for weights moving toward it, which is what movement
pruning learns.

* ``mode="topk"`` (hard movement pruning): M keeps the top ``density`` fraction of each layer's scores.
  The density can follow a schedule (``schedule=pk.schedules.AGP(...)``, sparsity -> density), advanced
  by ``step()`` after every optimizer step.
* ``mode="threshold"`` (soft movement pruning): M = sigmoid(S) > ``threshold``; the sparsity is learned,
  driven by the regulariser ``penalty()`` = mean of sigmoid(S) (add ``lam * penalty()`` to the loss).

``to_masks()`` turns the current binarised scores into prunekit masks and removes the scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from ..schedules import Schedule
from ..targets import Target, resolve_targets
from ._wrap import attach_parametrization, masks_sparsity, replace_with_masks

__all__ = ["LearnedMasks", "TopKBinarizer", "ThresholdBinarizer", "MODES"]

MODES = ("topk", "threshold")
INITS = ("magnitude", "constant")


class TopKBinarizer(torch.autograd.Function):
    """Forward: 1 for the ``ceil(density * n)`` largest scores, else 0. Backward: straight through."""

    @staticmethod
    def forward(ctx, scores: Tensor, density: float) -> Tensor:
        keep = max(1, math.ceil(density * scores.numel())) if density > 0 else 0
        mask = torch.zeros_like(scores)
        if keep:
            mask.view(-1)[torch.topk(scores.detach().reshape(-1), keep, sorted=False).indices] = 1.0
        return mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class ThresholdBinarizer(torch.autograd.Function):
    """Forward: 1 where sigmoid(score) > threshold. Backward: straight through (to the raw scores)."""

    @staticmethod
    def forward(ctx, scores: Tensor, threshold: float) -> Tensor:
        return (torch.sigmoid(scores) > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _ScoredMask(nn.Module):
    """Parametrization: weight * binarise(scores)."""

    def __init__(self, scores: Tensor, owner: LearnedMasks) -> None:
        super().__init__()
        self.scores = nn.Parameter(scores)
        self._owner = [owner]  # a list, so the controller is not registered as a submodule

    def binary(self) -> Tensor:
        owner = self._owner[0]
        if owner.mode == "topk":
            return TopKBinarizer.apply(self.scores, owner.density)
        return ThresholdBinarizer.apply(self.scores, owner.threshold)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.binary()


class LearnedMasks:
    """Trainable scores with a straight-through estimator on the targets' weights.

    Args:
        model: the network; wrap it before building the optimizer (the scores are parameters; Sanh et al.
            give them a larger learning rate, e.g. a separate parameter group ``lm.parameters()``).
        mode: ``"topk"`` (hard) or ``"threshold"`` (soft).
        density: kept fraction per layer for ``"topk"`` (overridden by ``schedule``).
        threshold: sigmoid threshold for ``"threshold"``.
        schedule: a prunekit schedule of the *sparsity*, applied by ``step()`` (``"topk"`` only).
        init: scores start at |w| (``"magnitude"``: the first mask is magnitude pruning) or at
            ``init_value`` (``"constant"``).
        targets, exclude: as in ``prunekit.prune``.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "topk",
        *,
        density: float = 1.0,
        threshold: float = 0.5,
        schedule: Schedule | None = None,
        init: str = "magnitude",
        init_value: float = 0.0,
        targets: Iterable[str | type[nn.Module]] | str | None = None,
        exclude: Iterable[str] | str = (),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if schedule is not None and (mode != "topk" or not isinstance(schedule, Schedule)):
            raise ValueError("schedule= takes a prunekit schedule and works with mode='topk' only")
        self.mode = mode
        self.density = self._check_density(density)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        self.threshold = float(threshold)
        self.schedule = schedule
        self.step_count = 0
        if schedule is not None:
            self.density = 1.0 - schedule.at(0)
        self.model = unwrap(model)
        self.targets: list[Target] = resolve_targets(self.model, targets, exclude)
        self.masks: dict[str, _ScoredMask] = {}
        for target in self.targets:
            with torch.no_grad():
                value = target.value.detach()
                scores = value.abs().clone() if init == "magnitude" else torch.full_like(value, float(init_value))
            module = _ScoredMask(scores, self)
            attach_parametrization(target, module)
            self.masks[target.name] = module
        self._attached = True

    @staticmethod
    def _check_density(value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {value!r}")
        return float(value)

    def parameters(self) -> list[nn.Parameter]:
        """The score tensors (for a parameter group of their own)."""
        return [m.scores for m in self.masks.values()]

    def set_density(self, density: float) -> None:
        """The kept fraction per layer for ``"topk"``."""
        self.density = self._check_density(density)

    def step(self) -> None:
        """Advance the sparsity schedule by one optimizer step (no-op without a schedule)."""
        self.step_count += 1
        if self.schedule is not None:
            self.density = 1.0 - self.schedule.at(self.step_count)

    def penalty(self) -> Tensor:
        """Mean of sigmoid(scores) over all scores: the soft-movement regulariser (Sanh et al. 2020)."""
        total = sum(torch.sigmoid(m.scores).sum() for m in self.masks.values())
        return total / sum(m.scores.numel() for m in self.masks.values())

    def binary_masks(self) -> dict[str, Tensor]:
        """The current binarised masks (True = kept)."""
        with torch.no_grad():
            return {name: m.binary().bool() for name, m in self.masks.items()}

    def sparsity(self) -> float:
        return masks_sparsity(self.binary_masks())

    def to_masks(self) -> dict[str, Tensor]:
        """Replace the scores by prunekit masks of the current binarisation. Returns the masks."""
        if not self._attached:
            raise RuntimeError("the learned masks were already removed")
        keep = self.binary_masks()
        masks = replace_with_masks(self.model, self.targets, self.masks, keep)
        self._attached = False
        return masks

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "density": self.density, "threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.density = float(state["density"])
        self.threshold = float(state["threshold"])

    def __repr__(self) -> str:
        return f"LearnedMasks(mode={self.mode!r}, density={self.density}, targets={len(self.targets)})"
