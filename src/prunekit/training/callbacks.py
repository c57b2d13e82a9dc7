"""Callbacks that drive a ``Pruner`` (or SET / RigL, or anything with ``step()``) from a trainer.

    trainer = lightning.Trainer(callbacks=[lightning_callback(pruner)])           # PyTorch Lightning
    trainer = transformers.Trainer(..., callbacks=[hf_callback(pruner)])           # Hugging Face

Each ``step()`` is called once per optimizer step, after the step and before the gradients are zeroed,
so gradient-based criteria can read ``.grad``: Lightning's ``on_train_batch_end`` (counting
``trainer.global_step``, so gradient accumulation calls it once per optimizer step, not per batch), and
Hugging Face's ``on_optimizer_step``. Lightning and transformers are imported when a callback is made,
not when prunekit is imported.

Resuming works with both. A checkpoint holds the model's ``state_dict`` with the dense keys (pruned
entries marked ``-0.0``, see :mod:`prunekit.masking`), so the trainer loads it into a fresh, unpruned
model, and ``from_pretrained`` / ``load_state_dict`` read it as a plain model. When training resumes,
the callback turns the marks back into masks on the steppers' targets and restores the steppers' state
(step counter, accumulated scores), so the schedule continues where it stopped and no prune step runs
twice. Lightning checkpoints hold the steppers' ``state_dict`` and the parameter names of every
optimizer group, and the optimizer state is re-matched to the parameters by name (attaching a mask
changes the order of ``model.parameters()``); Hugging Face checkpoints get a ``prunekit_steppers.pt``
(tensors only, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .. import masking
from ..fileio import atomic_open

__all__ = ["lightning_callback", "hf_callback", "Stepper", "rematch_optimizer_state", "STEPPERS_FILE"]

STEPPERS_FILE = "prunekit_steppers.pt"  # in a Hugging Face checkpoint folder


class Stepper(Protocol):
    """Anything with ``step()``, called once after every optimizer step (``Pruner``, ``SET``, ``RigL``)."""

    def step(self) -> Any: ...


def _check(steppers: tuple) -> tuple:
    if not steppers:
        raise ValueError("give at least one Pruner (or SET / RigL) to the callback")
    for s in steppers:
        if not callable(getattr(s, "step", None)):
            raise TypeError(f"{type(s).__name__} has no step() method; expected a Pruner, SET or RigL")
    return steppers


def _target_names(steppers) -> list[str] | None:
    """The parameters the steppers prune (``None``: not known, every parameter)."""
    names: list[str] = []
    for stepper in steppers:
        targets = getattr(getattr(stepper, "spec", None), "targets", None) or getattr(stepper, "targets", None)
        if not targets:
            return None
        names += [t.name for t in targets]
    return names


def _models(steppers) -> list[nn.Module]:
    out = []
    for stepper in steppers:
        model = getattr(stepper, "model", None)
        if isinstance(model, nn.Module) and all(model is not m for m in out):
            out.append(model)
    return out


def _restore(steppers, fallback: nn.Module | None) -> None:
    """After a checkpoint was loaded into the model: its marks of pruned entries become masks again."""
    names = _target_names(steppers)
    for model in _models(steppers) or ([fallback] if fallback is not None else []):
        masking.restore_masks(model, names)


def _steppers_state(steppers) -> list:
    return [s.state_dict() if hasattr(s, "state_dict") else None for s in steppers]


def _load_steppers_state(steppers, states: list) -> None:
    for stepper, saved in zip(steppers, states):
        if saved is not None and hasattr(stepper, "load_state_dict"):
            stepper.load_state_dict(saved)


def _param_names(model: nn.Module) -> dict[int, str]:
    return {pid: owners[0].qualified_name for pid, owners in masking.parameter_owners(model).items()}


def _group_names(optimizer, names: dict[int, str]) -> list[list[str | None]]:
    return [[names.get(id(p)) for p in group["params"]] for group in optimizer.param_groups]


def rematch_optimizer_state(saved: dict, saved_names: list, optimizer, names: dict[int, str]) -> dict:
    """Reorder a saved optimizer ``state_dict`` so that each parameter's state lands on the parameter of
    the same name in ``optimizer`` (torch matches them by position, and attaching a mask changes the
    order of ``model.parameters()``). Unchanged when the names do not fit group by group."""
    current = _group_names(optimizer, names)
    groups = saved.get("param_groups", [])
    if len(groups) != len(current) or len(saved_names) != len(current):
        return saved
    for group, old, new in zip(groups, saved_names, current):
        if old == new or None in new or sorted(old) != sorted(new) or len(set(new)) != len(new):
            continue
        by_name = dict(zip(old, group["params"]))
        group["params"] = [by_name[n] for n in new]
    return saved


def _close(steppers) -> None:
    for s in steppers:
        close = getattr(s, "close", None)
        if callable(close):
            close()


@functools.lru_cache(maxsize=None)
def _lightning_class(package: str):
    if package == "lightning":
        try:
            from lightning.pytorch import Callback
        except ImportError as error:
            raise ImportError('lightning_callback needs PyTorch Lightning: pip install "prunekit[lightning]"') from error
    elif package == "pytorch_lightning":
        from pytorch_lightning import Callback
    else:
        raise ValueError(f"package must be 'lightning' or 'pytorch_lightning', got {package!r}")

    class PruningCallback(Callback):
        """Calls every stepper's ``step()`` once per optimizer step of a Lightning ``Trainer``."""

        def __init__(self, *steppers: Stepper) -> None:
            self.steppers = _check(steppers)
            self._seen: int | None = None

        def on_train_start(self, trainer, pl_module) -> None:
            self._seen = trainer.global_step

        def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
            names = _param_names(pl_module)
            checkpoint["prunekit_optimizer_params"] = [_group_names(o, names) for o in trainer.optimizers]

        def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
            self._checkpoint = checkpoint  # the optimizer state is restored from it after on_fit_start

        def on_fit_start(self, trainer, pl_module) -> None:
            checkpoint = getattr(self, "_checkpoint", None)
            if checkpoint is None:
                return
            self._checkpoint = None
            # the optimizers exist now, built on the model as the trainer restored it: masks come back
            # after them (the parameters stay the same objects), and the saved optimizer state is
            # matched to the parameters by name
            _restore(self.steppers, pl_module)
            names = _param_names(pl_module)
            saved_names = checkpoint.get("prunekit_optimizer_params") or []
            for optimizer, state, group_names in zip(trainer.optimizers, checkpoint.get("optimizer_states", []), saved_names):
                rematch_optimizer_state(state, group_names, optimizer, names)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self._seen is None:
                self._seen = trainer.global_step
                return
            while self._seen < trainer.global_step:  # one call per optimizer step taken
                self._seen += 1
                for stepper in self.steppers:
                    stepper.step()

        def on_train_end(self, trainer, pl_module) -> None:
            _close(self.steppers)

        def state_dict(self) -> dict:
            return {"steppers": _steppers_state(self.steppers), "seen": self._seen}

        def load_state_dict(self, state_dict: dict) -> None:
            _load_steppers_state(self.steppers, state_dict.get("steppers", []))
            self._seen = state_dict.get("seen")

    return PruningCallback


def lightning_callback(*steppers: Stepper, package: str = "lightning"):
    """A PyTorch Lightning ``Callback`` calling ``step()`` of each stepper after every optimizer step.

    ``package="pytorch_lightning"`` builds it on the older ``pytorch_lightning`` distribution instead of
    ``lightning``.
    """
    _check(steppers)
    if package not in ("lightning", "pytorch_lightning"):
        raise ValueError(f"package must be 'lightning' or 'pytorch_lightning', got {package!r}")
    return _lightning_class(package)(*steppers)


@functools.lru_cache(maxsize=None)
def _hf_class():
    try:
        from transformers import TrainerCallback
    except ImportError as error:
        raise ImportError('hf_callback needs transformers: pip install "prunekit[llm]"') from error

    class HFPruningCallback(TrainerCallback):
        """Calls every stepper's ``step()`` after each optimizer step of a Hugging Face ``Trainer``;
        saves the steppers' state with each checkpoint and restores it (and the masks) on resume."""

        def __init__(self, *steppers: Stepper) -> None:
            self.steppers = _check(steppers)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step > 0:  # resumed: the trainer has loaded the checkpoint into the model
                _restore(self.steppers, model)
                saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STEPPERS_FILE
                if saved.is_file():
                    _load_steppers_state(self.steppers, torch.load(saved, weights_only=True))
                else:  # a checkpoint from elsewhere: the step counter is the trainer's
                    for stepper in self.steppers:
                        if hasattr(stepper, "step_count"):
                            stepper.step_count = state.global_step
            return control

        def on_optimizer_step(self, args, state, control, **kwargs):
            for stepper in self.steppers:
                stepper.step()
            return control

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.should_save and folder.is_dir():
                with atomic_open(folder / STEPPERS_FILE) as handle:
                    torch.save(_steppers_state(self.steppers), handle)
            return control

        def on_train_end(self, args, state, control, **kwargs):
            _close(self.steppers)
            return control

    return HFPruningCallback


def hf_callback(*steppers: Stepper):
    """A Hugging Face ``TrainerCallback`` calling ``step()`` of each stepper after every optimizer step
    (``on_optimizer_step``: after ``optimizer.step()``, before the gradients are zeroed)."""
    _check(steppers)
    return _hf_class()(*steppers)
