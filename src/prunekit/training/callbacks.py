"""Callbacks that drive a ``Pruner`` (or SET / RigL, or anything with ``step()``) from a trainer.

    trainer = lightning.Trainer(callbacks=[lightning_callback(pruner)])           # PyTorch Lightning
    trainer = transformers.Trainer(..., callbacks=[hf_callback(pruner)])           # Hugging Face

Each ``step()`` is called once per optimizer step, after the step and before the gradients are zeroed,
so gradient-based criteria can read ``.grad``: Lightning's ``on_train_batch_end`` (counting
``trainer.global_step``, so gradient accumulation calls it once per optimizer step, not per batch), and
Hugging Face's ``on_optimizer_step``. Lightning checkpoints include the steppers' ``state_dict``.
Lightning and transformers are imported when a callback is made, not when prunekit is imported.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

__all__ = ["lightning_callback", "hf_callback", "Stepper"]


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
            return {
                "steppers": [s.state_dict() if hasattr(s, "state_dict") else None for s in self.steppers],
                "seen": self._seen,
            }

        def load_state_dict(self, state_dict: dict) -> None:
            for stepper, saved in zip(self.steppers, state_dict.get("steppers", [])):
                if saved is not None and hasattr(stepper, "load_state_dict"):
                    stepper.load_state_dict(saved)
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
        """Calls every stepper's ``step()`` after each optimizer step of a Hugging Face ``Trainer``."""

        def __init__(self, *steppers: Stepper) -> None:
            self.steppers = _check(steppers)

        def on_optimizer_step(self, args, state, control, **kwargs):
            for stepper in self.steppers:
                stepper.step()
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
