"""Statistics over calibration data, collected once and shared by every criterion that needs them.

Gradients are taken with ``torch.autograd.grad`` on the targeted parameters only, so the user's
``.grad`` fields, the optimizer and the normalisation layers' running statistics stay untouched (the
model runs in eval mode during collection and gets its mode back afterwards).

Batch statistics (``grad_abs``, ``grad_sq``, ``movement``) sum one gradient per batch. The diagonal empirical Fisher
(``fisher``) sums *per-sample* squared gradients, ``(1/N) sum_n (dl_n/dw)^2`` over the N calibration
samples (``torch.func.vmap`` over ``grad``, in chunks), so it does not depend on how the data is batched:
the square of a batch's mean gradient would shrink with the batch size and, for one large batch, collapse
into the square of the full gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import eval_mode
from .targets import Target

__all__ = ["TargetStatistics", "collect_gradient_statistics", "batch_loss", "split_batch", "move_to"]

LossFn = Callable[..., Tensor]


@dataclass
class TargetStatistics:
    """Running sums for one parameter. ``count`` batches have been seen."""

    count: int = 0
    grad_abs_sum: Tensor | None = None  # sum of |batch gradient| (no cancellation between batches)
    grad_sq_sum: Tensor | None = None  # sum of squared batch gradients
    fisher_sum: Tensor | None = None  # sum over samples of squared per-sample gradients
    samples: int = 0  # samples behind ``fisher_sum``
    movement: Tensor | None = None  # sum of -w * g (movement pruning, Sanh et al. 2020)
    extra: dict = field(default_factory=dict)

    @property
    def grad_abs_mean(self) -> Tensor:
        return self.grad_abs_sum / max(self.count, 1)

    @property
    def fisher_diag(self) -> Tensor:
        """Diagonal empirical Fisher: the mean over samples of the squared per-sample gradient."""
        return self.fisher_sum / max(self.samples, 1)

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


def split_batch(batch: object) -> tuple[tuple, dict, Tensor | None]:
    """(args, kwargs, labels) of a calibration batch: ``(inputs, labels)``, a tensor, or a dict."""
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        labels = kwargs.pop("labels", None)
        return (), kwargs, labels
    if isinstance(batch, Tensor):
        return (batch,), {}, None
    if isinstance(batch, Sequence) and len(batch) == 2:
        inputs, labels = batch
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return args, {}, labels if isinstance(labels, Tensor) else None
    raise TypeError(f"a calibration batch must be (inputs, labels), a tensor or a dict, got {type(batch).__name__}")


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
    batch_needs = needs - {"fisher"}
    with eval_mode(model):
        seen = 0
        for batch in islice(data, max_batches):
            if batch_needs:
                loss = batch_loss(model, batch, loss_fn)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for target, grad in zip(targets, grads):
                    if grad is None:
                        grad = torch.zeros_like(target.parameter)
                    stats[target.name].add(grad, target.value, batch_needs)
            if "fisher" in needs:
                count, sums = per_sample_squared_gradients(model, params, batch, loss_fn)
                for target, sq in zip(targets, sums):
                    s = stats[target.name]
                    s.fisher_sum = sq if s.fisher_sum is None else s.fisher_sum.add_(sq)
                    s.samples += count
                    if not batch_needs:
                        s.count += 1
            seen += 1
        if seen == 0:
            raise ValueError("the calibration data yielded no batch")
    return stats


_CHUNK_FLOATS = 1 << 25  # per-sample gradients held at once (128 MiB of float32)


class _LossOf(nn.Module):
    """``batch -> loss`` as a module, so ``torch.func.functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return batch_loss(self.model, batch, self.loss_fn)


def _batch_size(batch) -> int:
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor) and t.dim() > 0]
    if not leaves:
        raise ValueError("per-sample gradients need batches of tensors with a leading batch dimension")
    return leaves[0].shape[0]


def per_sample_squared_gradients(
    model: nn.Module, params: Sequence[Tensor], batch, loss_fn: LossFn | None = None
) -> tuple[int, list[Tensor]]:
    """``(N, [sum over the batch's N samples of (dl_n/dp)^2 for p in params])``.

    Computed with ``torch.func.vmap`` over ``torch.func.grad`` on chunks of the batch; a model that
    ``vmap`` cannot run (data-dependent control flow) falls back to one backward pass per sample.
    """
    from torch.func import functional_call, grad, vmap
    from torch.utils._pytree import tree_map

    wrapper = _LossOf(model, loss_fn)
    names = {id(p): n for n, p in wrapper.named_parameters(remove_duplicate=False)}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError("per-sample gradients: a target parameter is not a parameter of the model")
    target_names = [names[id(p)] for p in params]
    fixed = {n: p.detach() for n, p in wrapper.named_parameters() if n not in set(target_names)}
    fixed.update(dict(wrapper.named_buffers()))
    n = _batch_size(batch)

    def sample_loss(weights: dict, sample):
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, sample)
        return functional_call(wrapper, {**fixed, **weights}, (one,))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))
    weights = {name: p.detach() for name, p in zip(target_names, params)}
    chunk = max(1, min(n, _CHUNK_FLOATS // max(sum(p.numel() for p in params), 1)))
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    try:
        for start in range(0, n, chunk):
            part = tree_map(lambda t: t[start:start + chunk] if isinstance(t, Tensor) and t.dim() else t, batch)
            grads = per_sample(weights, part)
            for total, name in zip(sums, target_names):
                total.add_(grads[name].float().square().sum(0))
    except (RuntimeError, NotImplementedError) as error:  # vmap cannot run this model
        warnings.warn(f"per-sample gradients fall back to one backward pass per sample ({error})", stacklevel=2)
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for i in range(n):
            one = tree_map(lambda t: t[i:i + 1] if isinstance(t, Tensor) and t.dim() else t, batch)
            grads = torch.autograd.grad(batch_loss(model, one, loss_fn), list(params), allow_unused=True)
            for total, g in zip(sums, grads):
                if g is not None:
                    total.add_(g.detach().float().square())
    return n, sums
