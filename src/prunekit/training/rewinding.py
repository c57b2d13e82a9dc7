"""Weight rewinding and learning-rate rewinding.

* **Weight rewinding** (Frankle et al. 2019, "Stabilizing the lottery ticket hypothesis"): after pruning,
  reset the surviving weights to their values at an early step ``k`` (``k = 0``: initialisation) and the
  learning-rate schedule to step ``k``, then retrain.
* **Learning-rate rewinding** (Renda et al. 2020): keep the trained weights and replay the learning-rate
  schedule from step ``k``.

Both start from a ``Checkpoint``, taken with ``capture`` during the first training run:

    early = capture(model, step=100, optimizer=opt, scheduler=sched)   # at step 100
    ...  # train to the end, prune
    rewind(model, early, optimizer=opt, scheduler=sched)                # weight rewinding
    rewind(model, early, optimizer=opt, scheduler=sched, weights=False) # learning-rate rewinding

A checkpoint holds copies of the raw parameters (named as users know them, ``"fc1.weight"``), of the
buffers (BatchNorm statistics; masks excluded) and, when given, of the optimizer's hyperparameters and
the scheduler's state. Masks are not part of it: rewinding keeps the current masks, so pruned weights
stay zero and every surviving weight gets exactly its saved value back.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import masking
from ..distributed import unwrap

__all__ = [
    "Checkpoint",
    "capture",
    "rewind",
    "rewind_weights",
    "rewind_learning_rate",
    "replay_schedule",
    "named_raw_parameters",
    "named_checkpoint_buffers",
]

_OPTIMIZER_STATES = ("reset", "keep")


@dataclass
class Checkpoint:
    """Saved values at one training step (see ``capture``)."""

    step: int | None
    weights: dict[str, Tensor]
    buffers: dict[str, Tensor] = field(default_factory=dict)
    param_groups: list[dict] | None = None  # the optimizer's hyperparameters (lr, momentum, ...), per group
    scheduler: dict | None = None

    def __repr__(self) -> str:
        return f"Checkpoint(step={self.step}, weights={len(self.weights)}, buffers={len(self.buffers)})"


def named_raw_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter once, by its user-facing name, as stored (before any mask)."""
    return {
        owners[0].qualified_name: masking.raw_parameter(owners[0].module, owners[0].param_name)
        for owners in masking.parameter_owners(model).values()
    }


def named_checkpoint_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Every buffer a checkpoint rewinds, by full name: persistent or not, masks excepted."""
    out = {}
    for module_name, module in model.named_modules():
        if isinstance(module, masking.PruningMask):
            continue
        for name, buf in module._buffers.items():
            if buf is not None:
                out[f"{module_name}.{name}" if module_name else name] = buf
    return out


def capture(
    model: nn.Module,
    step: int | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    buffers: bool = True,
) -> Checkpoint:
    """Copy the model's raw parameters (and buffers, and the learning-rate state) at ``step``."""
    model = unwrap(model)
    with torch.no_grad():
        weights = {name: p.detach().clone() for name, p in named_raw_parameters(model).items()}
        saved_buffers = {name: b.detach().clone() for name, b in named_checkpoint_buffers(model).items()} if buffers else {}
    groups = None
    if optimizer is not None:
        groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]
    state = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    return Checkpoint(step, weights, saved_buffers, groups, state)


def rewind_weights(model: nn.Module, checkpoint: Checkpoint, *, strict: bool = True) -> list[str]:
    """Set every parameter (and saved buffer) back to its value in ``checkpoint``; masks stay, so pruned
    entries stay zero and surviving ones get exactly their saved values. Returns the names restored.

    Everything is checked before anything is written: a parameter of the model missing from the
    checkpoint (``strict``) or a shape that changed raises ``ValueError``.
    """
    model = unwrap(model)
    params = named_raw_parameters(model)
    bufs = named_checkpoint_buffers(model)
    missing = [n for n in params if n not in checkpoint.weights]
    if strict and missing:
        raise ValueError(f"the checkpoint has no values for {', '.join(missing)} (added after it was taken?)")
    unknown = [n for n in checkpoint.weights if n not in params]
    if unknown:
        raise ValueError(f"the checkpoint has values for {', '.join(unknown)}, which the model does not have")
    pairs = [(params[n], v, n) for n, v in checkpoint.weights.items()]
    pairs += [(bufs[n], v, n) for n, v in checkpoint.buffers.items() if n in bufs]
    for target, value, name in pairs:
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{name}: shape {tuple(target.shape)} differs from the checkpoint's {tuple(value.shape)}")
    current = masking.masks(model)
    with torch.no_grad():
        for target, value, _ in pairs:
            target.copy_(value)
        for name, mask in current.items():
            params[name].masked_fill_(~mask, 0)
    return [name for _, _, name in pairs]


def rewind_learning_rate(optimizer: torch.optim.Optimizer, scheduler, checkpoint: Checkpoint,
                         optimizer_state: str = "reset") -> None:
    """Put the optimizer's hyperparameters (learning rate, ...) and the scheduler back to ``checkpoint``,
    so that the rest of training replays the schedule from the checkpoint's step.

    ``optimizer_state="reset"`` (default) clears the optimizer's per-parameter state (momentum, Adam
    moments), as a new training run from that step would start; ``"keep"`` leaves it.
    """
    if optimizer_state not in _OPTIMIZER_STATES:
        raise ValueError(f"optimizer_state must be one of {_OPTIMIZER_STATES}, got {optimizer_state!r}")
    if optimizer is not None:
        if checkpoint.param_groups is None:
            raise ValueError("the checkpoint holds no optimizer state: pass optimizer= to capture()")
        if len(checkpoint.param_groups) != len(optimizer.param_groups):
            raise ValueError(
                f"the optimizer has {len(optimizer.param_groups)} parameter groups, "
                f"the checkpoint {len(checkpoint.param_groups)}"
            )
    if scheduler is not None and checkpoint.scheduler is None:
        raise ValueError("the checkpoint holds no scheduler state: pass scheduler= to capture()")
    if optimizer is not None:
        for group, saved in zip(optimizer.param_groups, checkpoint.param_groups):
            group.update(copy.deepcopy(saved))
        if optimizer_state == "reset":
            optimizer.state.clear()
    if scheduler is not None:
        scheduler.load_state_dict(copy.deepcopy(checkpoint.scheduler))


def rewind(
    model: nn.Module,
    checkpoint: Checkpoint,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    weights: bool = True,
    learning_rate: bool = True,
    optimizer_state: str = "reset",
) -> None:
    """Weight rewinding (``weights=True``: weights and learning-rate schedule back to the checkpoint) or
    learning-rate rewinding (``weights=False``: only the schedule). The optimizer's per-parameter state is
    cleared by default (see ``rewind_learning_rate``)."""
    if not weights and not learning_rate:
        raise ValueError("nothing to rewind: weights and learning_rate are both False")
    if learning_rate and (optimizer is not None or scheduler is not None):
        rewind_learning_rate(optimizer, scheduler, checkpoint, optimizer_state)
    elif optimizer is not None and optimizer_state == "reset":
        optimizer.state.clear()
    if weights:
        rewind_weights(model, checkpoint)


def replay_schedule(scheduler, steps: int) -> None:
    """Advance a freshly built learning-rate scheduler by ``steps`` steps without training (learning-rate
    rewinding when no checkpoint of the schedule was taken): the optimizer's learning rate is then the
    schedule's value at ``steps``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()
