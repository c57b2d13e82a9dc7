"""``Pruner``: pruning on a schedule, from inside any training loop.

    pruner = pk.Pruner(model, pk.schedules.AGP(final=0.9, start=0, end=1000, every=100))
    for batch in data:
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        pruner.step()

Call ``step()`` once per optimizer step, after it. On the schedule's prune steps the masks are re-scored
and tightened to the schedule's sparsity. Gradient-based criteria either score on ``data`` given here, or,
without data, on the gradients of the training steps since the last prune step (read from ``.grad``, so
call ``step()`` before the gradients are zeroed). Movement scores accumulate over all steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .pruning import PruneReport, PruningOptions, PruningPlan, PruningSpec, options_signature
from .schedules import Schedule
from .statistics import TargetStatistics

__all__ = ["Pruner"]


class Pruner:
    """Applies ``schedule`` to ``model``: with masks as described by the keyword arguments (the fields of
    :class:`~prunekit.pruning.PruningOptions`, as for ``prune``), or with ``structured=``, any
    :class:`~prunekit.pruning.PruningPlan` such as ``pk.structured.StructuredSpec(model, example_inputs,
    method=..., scope=...)``, which prunes whole channel groups (as channel masks, made physical
    afterwards by ``spec.compact()``) and carries its own method and scope."""

    def __init__(self, model: nn.Module, schedule: Schedule, *, structured: PruningPlan | None = None,
                 **options: Any) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a prunekit schedule (OneShot, Iterative, AGP), got {schedule!r}")
        request = PruningOptions.from_kwargs("Pruner", options)
        if structured is not None:
            if not isinstance(structured, PruningPlan) or getattr(structured, "model", None) is not model:
                raise ValueError("structured= must be a prunekit.structured.StructuredSpec built on this model")
            unused = sorted(k for k in options if k not in ("data", "loss_fn", "max_batches"))
            if unused:
                raise ValueError(f"with structured=, the spec carries the method and scope; {', '.join(unused)} "
                                 "would not be used (give them to the StructuredSpec)")
        self.spec: PruningPlan = structured if structured is not None else PruningSpec(model, request)
        self.schedule = schedule
        self.spec.check_sparsity(schedule.final)  # N:M: the schedule must say the pattern's sparsity
        if request.data is None and "fisher" in self.spec.gradient_needs:
            raise ValueError(
                f"method {self.spec.method_name!r} needs per-sample gradients, which training steps do not "
                "give: pass the Pruner calibration batches with data="
            )
        self.data, self.loss_fn, self.max_batches = request.data, request.loss_fn, request.max_batches
        self.step_count = 0
        self.history: list[PruneReport] = []
        self._running: dict[str, TargetStatistics] = {t.name: TargetStatistics() for t in self.spec.gradient_targets}

    @property
    def model(self) -> nn.Module:
        return self.spec.model

    @property
    def target_sparsity(self) -> float:
        """The schedule's sparsity at the current step."""
        return self.schedule.at(max(self.step_count - 1, 0))

    def _observe_gradients(self) -> None:
        needs = self.spec.gradient_needs
        if not needs or (self.data is not None and "movement" not in needs):
            return
        with torch.no_grad():
            for target in self.spec.gradient_targets:
                grad = target.parameter.grad
                if grad is not None:
                    self._running[target.name].add(grad, target.value, needs)

    def _statistics(self) -> Mapping[str, TargetStatistics] | None:
        needs = self.spec.gradient_needs
        if not needs:
            return None
        if self.data is not None and "movement" not in needs:
            return self.spec.statistics(self.data, self.loss_fn, self.max_batches)
        if all(s.count == 0 for s in self._running.values()):
            raise RuntimeError(
                f"method {self.spec.method_name!r} needs gradients: call pruner.step() after "
                "optimizer.step() and before the gradients are zeroed, or give the Pruner data="
            )
        return self._running

    def step(self) -> PruneReport | None:
        """Advance one training step; prune when the schedule says so. Returns the report, if it pruned."""
        step = self.step_count
        self._observe_gradients()
        report = None
        if self.schedule.is_prune_step(step) and self.schedule.at(step) > 0:
            sparsity = None if self.spec.fixed_sparsity is not None else self.schedule.at(step)
            stats = self._statistics()
            with torch.no_grad():
                rows = self.spec.apply(self.spec.compute_masks(sparsity, stats, self.data))
            report = self.spec.report(sparsity, rows)
            self.history.append(report)
            for stat in self._running.values():  # gradient sums restart; movement keeps accumulating
                stat.count, stat.grad_abs_sum, stat.grad_sq_sum = 0, None, None
        self.step_count += 1
        return report

    def state_dict(self) -> dict:
        """Step counter and accumulated scores, for checkpoints (masks live in the model's state dict)."""
        return {
            "step_count": self.step_count,
            "movement": {n: s.movement for n, s in self._running.items() if s.movement is not None},
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.step_count = int(state["step_count"])
        for name, value in state.get("movement", {}).items():
            if name not in self._running:
                raise KeyError(f"the checkpoint has movement scores for {name!r}, which this Pruner does not prune")
            self._running[name].movement = value.clone()


options_signature(Pruner.__init__, PruningOptions, [
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module"),
    inspect.Parameter("schedule", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="Schedule"),
], [inspect.Parameter("structured", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="PruningPlan | None")])
