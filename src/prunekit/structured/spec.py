"""Iterative structured pruning through the same ``Pruner`` and schedules.

    spec = pk.structured.StructuredSpec(model, example_inputs, method="l1", scope="global")
    pruner = pk.Pruner(model, pk.schedules.AGP(final=0.5, start=0, end=300, every=50), structured=spec)
    ...; optimizer.step(); pruner.step()        # channel groups are masked on the schedule
    spec.compact()                              # then removed physically (outputs unchanged)

During training the channels are *masked* (every parameter of the group, norm biases included), so the
optimizer keeps its parameters and its state; ``compact`` turns the masks into surgery at the end. The
schedule's sparsity is the fraction of channels removed.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .. import masking
from ..modules import check_model
from ..pruning import LayerReport, PruneReport, options_signature
from ..scope import check_sparsity
from .api import (
    StructuredOptions,
    StructuredReport,
    masked_channels,
    remove_dead,
    score_groups,
    select_channels,
)
from .criteria import ScoringContext
from .graph import DependencyGraph
from .surgery import channel_masks
from .undo import all_or_nothing

__all__ = ["StructuredSpec"]


class StructuredSpec:
    """A validated structured-pruning request bound to a model: a :class:`~prunekit.pruning.PruningPlan`
    that ``pk.Pruner(..., structured=spec)`` drives, masking whole channel groups.

    Options as in :func:`prunekit.structured.prune` (the fields of :class:`StructuredOptions`, by keyword,
    or ``method`` and ``scope`` by position); ``data`` (or the Pruner's ``data=``) feeds the
    data-driven methods at every prune step. Structured criteria collect their own statistics, so the
    Pruner gathers no gradients for it (``gradient_needs`` is empty).
    """

    #: a structured spec prunes at the schedule's sparsity and needs no gradients from training steps
    fixed_sparsity = None
    gradient_needs: frozenset[str] = frozenset()
    gradient_targets: tuple = ()

    def __init__(self, model: nn.Module, example_inputs: Any, *args: Any, **kwargs: Any) -> None:
        check_model(model)  # a module with real weights
        options = StructuredOptions(*args, **kwargs)
        self.group_criterion = options.criterion()
        self.options = options
        self.round_to = options.round_to
        self.min_channels = options.min_channels
        self.model = model
        self.example_inputs = example_inputs
        self.scope_name = options.scope
        self.data, self.loss_fn, self.max_batches, self.seed = (options.data, options.loss_fn, options.max_batches,
                                                                options.seed)
        self.exclude, self.unknown = options.exclude, options.unknown
        self.graph = DependencyGraph(model, example_inputs, exclude=self.exclude, unknown=self.unknown)
        if not self.graph.groups():
            raise ValueError("the model has no prunable channel group (see DependencyGraph(...).boundaries())")

    @property
    def method_name(self) -> str:
        return self.group_criterion.name or type(self.group_criterion).__name__

    def check_sparsity(self, sparsity: float | None) -> float:
        if sparsity is None:
            raise ValueError("sparsity (the fraction of channels to remove) is required")
        return check_sparsity(sparsity)

    def statistics(self, data, loss_fn, max_batches=None) -> None:
        return None

    def _refresh_masks(self) -> None:
        for info in self.graph.tensors:
            if info.kind == "parameter":
                info.mask = masking.get_mask(self.model, info.name)

    def masked(self) -> list[torch.Tensor]:
        """Per group, which channels are masked out now."""
        self._refresh_masks()
        return [masked_channels(g) for g in self.graph.groups()]

    def compute_masks(self, sparsity: float, stats: Mapping | None = None, data: Iterable | None = None) -> dict[int, torch.Tensor]:
        """Channels to mask per group (``{group index: channels}``) so that ``sparsity`` of all channels
        are masked; channels masked before stay masked. The model is not changed."""
        sparsity = self.check_sparsity(sparsity)
        data = self.data if self.data is not None else data
        if self.group_criterion.needs_data and data is None:
            raise ValueError(f"method {self.method_name!r} is data-driven: give the StructuredSpec (or the Pruner) data=")
        already = self.masked()
        context = ScoringContext(self.graph, data, self.loss_fn, self.max_batches, self.seed)
        scores = score_groups(self.graph, self.group_criterion, context)
        return select_channels(self.graph.groups(), scores, sparsity, self.scope_name, round_to=self.round_to,
                               min_channels=self.min_channels, already=already)

    def apply(self, removal: Mapping[int, torch.Tensor]) -> list[LayerReport]:
        """Mask the channels (every parameter of their group); one report row per group."""
        before = [m.float().mean().item() for m in self.masked()]
        masks = channel_masks(self.graph, removal)
        written = [info.tensor for info in self.graph.tensors if info.name in masks]  # attach zeroes them
        with all_or_nothing(self.model, written), torch.no_grad():
            for name, keep in masks.items():
                masking.attach(self.model, name, keep, copy=False)
        after = [m.float().mean().item() for m in self.masked()]
        return [LayerReport(g.name, (g.size,), g.size, b, a) for g, b, a in zip(self.graph.groups(), before, after)]

    def report(self, sparsity: float | None, rows: list[LayerReport]) -> PruneReport:
        return PruneReport(self.method_name, "channel", self.scope_name, sparsity, rows)

    def compact(self) -> StructuredReport:
        """Remove the masked channels physically (and any other dead channel): outputs are unchanged.
        The spec cannot prune further afterwards (build a new one)."""
        before = _stored_params(self.model)
        report = remove_dead(self.model, self.example_inputs, exclude=self.exclude, unknown=self.unknown)
        self.graph.stale = True
        # the parameters stored before and after the removal (masked entries count: they were there)
        return dataclasses.replace(report, params_before=before, params_after=_stored_params(self.model))


def _stored_params(model: nn.Module) -> int:
    return sum(t.numel() for _, t in masking.named_effective_tensors(model))


options_signature(StructuredSpec.__init__, StructuredOptions, [
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module"),
    inspect.Parameter("example_inputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="Any"),
])
