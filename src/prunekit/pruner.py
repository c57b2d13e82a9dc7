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

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .criteria import Criterion
from .granularity import NM, Granularity
from .pruning import PruneReport, PruningSpec
from .schedules import Schedule
from .scope import Scope
from .statistics import LossFn, TargetStatistics

__all__ = ["Pruner"]


class Pruner:
    """Applies ``schedule`` to ``model`` with the given method, granularity and scope (see ``prune``)."""

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        method: str | Criterion = "magnitude",
        granularity: str | Granularity = "element",
        scope: str | Mapping[str, float] | Scope = "global",
        targets: Iterable[str | type[nn.Module]] | str | None = None,
        exclude: Iterable[str] | str = (),
        data: Iterable | None = None,
        loss_fn: LossFn | None = None,
        *,
        group_norm: str = "l1",
        max_layer_sparsity: float | None = None,
        seed: int = 0,
        max_batches: int | None = None,
        structured: object | None = None,
    ) -> None:
        """``structured=pk.structured.StructuredSpec(model, example_inputs, method=..., scope=...)`` prunes
        whole channel groups (as channel masks, made physical afterwards by ``spec.compact()``); the
        spec then carries the method and scope, and the arguments above it are not used."""
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a prunekit schedule (OneShot, Iterative, AGP), got {schedule!r}")
        if structured is not None and getattr(structured, "model", None) is not model:
            raise ValueError("structured= must be a prunekit.structured.StructuredSpec built on this model")
        self.spec = structured if structured is not None else PruningSpec(
            model, method, granularity, scope, targets, exclude, group_norm, max_layer_sparsity, seed)
        self.schedule = schedule
        self.spec.check_sparsity(schedule.final)  # N:M: the schedule must say the pattern's sparsity
        if data is None and "fisher" in getattr(self.spec.criterion, "needs", ()):
            raise ValueError(
                f"method {self.spec.method_name!r} needs per-sample gradients, which training steps do not "
                "give: pass the Pruner calibration batches with data="
            )
        self.data, self.loss_fn, self.max_batches = data, loss_fn, max_batches
        self.step_count = 0
        self.history: list[PruneReport] = []
        self._running: dict[str, TargetStatistics] = {t.name: TargetStatistics() for t in self.spec.targets}

    @property
    def model(self) -> nn.Module:
        return self.spec.model

    @property
    def target_sparsity(self) -> float:
        """The schedule's sparsity at the current step."""
        return self.schedule.at(max(self.step_count - 1, 0))

    def _observe_gradients(self) -> None:
        needs = self.spec.criterion.needs
        if not needs or (self.data is not None and "movement" not in needs):
            return
        with torch.no_grad():
            for target in self.spec.targets:
                grad = target.parameter.grad
                if grad is not None:
                    self._running[target.name].add(grad, target.value, needs)

    def _statistics(self) -> Mapping[str, TargetStatistics] | None:
        needs = self.spec.criterion.needs
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
            sparsity = None if isinstance(self.spec.granularity, NM) else self.schedule.at(step)
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
