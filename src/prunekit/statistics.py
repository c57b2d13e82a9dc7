"""Statistics over calibration data, collected once and shared by every criterion that needs them.

Gradients are taken with ``torch.autograd.grad`` on the targeted parameters only, so the user's
``.grad`` fields, the optimizer and the normalisation layers' running statistics stay untouched (the
model runs in eval mode during collection and gets its mode back afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .targets import Target

__all__ = ["TargetStatistics", "collect_gradient_statistics", "batch_loss", "move_to"]

LossFn = Callable[..., Tensor]


@dataclass
class TargetStatistics:
    """Running sums for one parameter. ``count`` batches have been seen."""

    count: int = 0
    grad_abs_sum: Tensor | None = None  # sum of |batch gradient| (no cancellation between batches)
    grad_sq_sum: Tensor | None = None  # sum of squared batch gradients (diagonal empirical Fisher)
    movement: Tensor | None = None  # sum of -w * g (movement pruning, Sanh et al. 2020)
    extra: dict = field(default_factory=dict)

    @property
    def grad_abs_mean(self) -> Tensor:
        return self.grad_abs_sum / max(self.count, 1)

    @property
    def fisher_diag(self) -> Tensor:
        return self.grad_sq_sum / max(self.count, 1)

    def add(self, grad: Tensor, weight: Tensor, needs: frozenset[str]) -> None:
        """Accumulate one batch gradient of this parameter."""
        grad = grad.detach()
        self.count += 1
        if "grad_abs" in needs:
            magnitude = grad.abs()
            self.grad_abs_sum = magnitude if self.grad_abs_sum is None else self.grad_abs_sum.add_(magnitude)
        if "grad_sq" in needs:
            sq = grad.square()
            self.grad_sq_sum = sq if self.grad_sq_sum is None else self.grad_sq_sum.add_(sq)
        if "movement" in needs:
            step = -(weight.detach() * grad)
            self.movement = step if self.movement is None else self.movement.add_(step)


def move_to(obj, device: torch.device):
    """Move tensors inside nested tuples, lists and dicts to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def batch_loss(model: nn.Module, batch, loss_fn: LossFn | None = None) -> Tensor:
    """The loss of one batch.

    A batch is ``(inputs, labels)`` (``inputs`` a tensor or a tuple of positional arguments) or a dict
    of keyword arguments (Hugging Face style). ``loss_fn(outputs, labels)`` defaults to cross-entropy;
    for dict batches the model's own ``outputs.loss`` is used when ``loss_fn`` is not given.
    """
    device = next(model.parameters()).device
    batch = move_to(batch, device)
    if isinstance(batch, Mapping):
        outputs = model(**batch)
        if loss_fn is None:
            loss = getattr(outputs, "loss", None)
            if loss is None and isinstance(outputs, Mapping):
                loss = outputs.get("loss")
            if loss is None:
                raise ValueError("dict batches need a loss_fn, or a model that returns .loss")
            return loss
        return loss_fn(outputs, batch.get("labels"))
    if isinstance(batch, Sequence) and len(batch) == 2:
        inputs, labels = batch
        outputs = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
        return (loss_fn or F.cross_entropy)(outputs, labels)
    raise TypeError(
        "a batch must be (inputs, labels) or a dict of model keyword arguments, "
        f"got {type(batch).__name__}"
    )


def collect_gradient_statistics(
    model: nn.Module,
    targets: Sequence[Target],
    data: Iterable,
    loss_fn: LossFn | None,
    needs: frozenset[str],
    max_batches: int | None = None,
) -> dict[str, TargetStatistics]:
    """Accumulate gradient statistics of ``targets`` over the batches of ``data``."""
    stats = {t.name: TargetStatistics() for t in targets}
    params = [t.parameter for t in targets]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in islice(data, max_batches):
            loss = batch_loss(model, batch, loss_fn)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for target, grad in zip(targets, grads):
                if grad is None:
                    grad = torch.zeros_like(target.parameter)
                stats[target.name].add(grad, target.value, needs)
            seen += 1
        if seen == 0:
            raise ValueError("the calibration data yielded no batch")
    finally:
        model.train(was_training)
    return stats
