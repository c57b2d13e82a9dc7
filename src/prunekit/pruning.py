"""``prunekit.prune``: criterion x granularity x scope, applied as masks.

:class:`PruningOptions` describes a pruning request once (its fields are the keyword arguments of
``prune`` and ``Pruner``); ``PruningSpec`` validates it against a model (so nothing changes on bad input)
and computes new masks; ``prune`` is the one-shot call, and ``Pruner`` (pruner.py) drives any
:class:`PruningPlan` (a ``PruningSpec``, or a structured spec) on a schedule.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from . import distributed, masking
from .criteria import Criterion, get_criterion
from .granularity import GROUP_NORMS, NM, Granularity, get_granularity
from .scope import LayerScores, PerLayer, Scope, check_sparsity, get_scope, warn_emptied
from .statistics import LossFn, TargetStatistics, collect_gradient_statistics
from .modules import check_model, fraction_pruned
from .registry import did_you_mean
from .targets import Target, resolve_targets

__all__ = ["prune", "PruningSpec", "PruningOptions", "PruningPlan", "PruneReport", "LayerReport",
           "check_layer_cap", "options_signature", "options_from_kwargs"]


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, ...]
    numel: int
    sparsity_before: float
    sparsity_after: float


@dataclass
class PruneReport:
    """What a pruning call did, layer by layer."""

    method: str
    granularity: str
    scope: str
    target_sparsity: float | None
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of the targets' entries that are pruned now."""
        total = sum(l.numel for l in self.layers)
        return sum(l.sparsity_after * l.numel for l in self.layers) / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "granularity": self.granularity,
            "scope": self.scope,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "layers": [l.__dict__ for l in self.layers],
        }

    def __str__(self) -> str:
        width = max([len(l.name) for l in self.layers] + [5])
        lines = [
            f"pruned with {self.method}, {self.granularity}, {self.scope}: sparsity {self.sparsity:.2%}",
            f"{'layer':<{width}}  {'shape':>18}  {'before':>7}  {'after':>7}",
        ]
        for l in self.layers:
            shape = "x".join(map(str, l.shape))
            lines.append(f"{l.name:<{width}}  {shape:>18}  {l.sparsity_before:>7.2%}  {l.sparsity_after:>7.2%}")
        return "\n".join(lines)


@dataclass(frozen=True)
class PruningOptions:
    """How to prune with masks: the one description of a request, shared by ``prune``, ``Pruner`` and
    ``PruningSpec`` (their keyword arguments are these fields).

    Attributes:
        method: scoring criterion, e.g. ``"magnitude"``, ``"random"``, ``"taylor"``, ``"obd"``
            (``prunekit methods`` lists all).
        granularity: ``"element"``, ``"vector"``, ``"column"``, ``"kernel"``, ``"channel"`` or ``"N:M"``
            such as ``"2:4"``.
        scope: ``"global"``, ``"local"``, ``"lamp"``, ``"erk"``, or ``{layer pattern: sparsity}``.
        targets: module types, or module/parameter names or globs; default every Linear and conv weight.
        exclude: module or parameter names or globs left alone.
        group_norm: how element scores reduce to group scores, ``"l1"`` or ``"l2"``.
        max_layer_sparsity: no layer is pruned beyond this fraction.
        seed: seed of the ``random`` criterion.
        data, loss_fn: calibration batches ``(inputs, labels)`` and a loss (cross-entropy by default)
            for data-driven criteria.
        max_batches: use at most this many batches of ``data``.
    """

    method: str | Criterion = "magnitude"
    granularity: str | Granularity = "element"
    scope: str | Mapping[str, float] | Scope = "global"
    targets: Iterable[str | type[nn.Module]] | str | None = None
    exclude: Iterable[str] | str = ()
    group_norm: str = "l1"
    max_layer_sparsity: float | None = None
    seed: int = 0
    data: Iterable | None = None
    loss_fn: LossFn | None = None
    max_batches: int | None = None

    @classmethod
    def from_kwargs(cls, caller: str, kwargs: Mapping[str, Any]) -> PruningOptions:
        """The options given to ``caller`` as keyword arguments; an unknown one raises ``TypeError``."""
        return options_from_kwargs(cls, caller, kwargs)


def options_from_kwargs(options: type, caller: str, kwargs: Mapping[str, Any]) -> Any:
    """``options(**kwargs)`` for the dataclass ``options``; an unknown keyword raises ``TypeError`` naming
    ``caller`` and the closest field."""
    names = [f.name for f in dataclasses.fields(options)]
    for key in kwargs:
        if key not in names:
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}{did_you_mean(key, names)} "
                            f"(it takes: {', '.join(names)})")
    return options(**kwargs)


def options_signature(fn: Callable, options: type, leading: Sequence[inspect.Parameter],
                      trailing: Sequence[inspect.Parameter] = ()) -> Callable:
    """Give ``fn(..., **options)`` the signature that lists the options' fields (for help() and IDEs):
    ``leading`` parameters, then every field of the dataclass ``options`` as a keyword, then ``trailing``."""
    fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
              for f in dataclasses.fields(options)]
    fn.__signature__ = inspect.Signature([*leading, *fields, *trailing])
    return fn


@runtime_checkable
class PruningPlan(Protocol):
    """What ``Pruner`` drives on a schedule: a validated request bound to a model.

    ``PruningSpec`` (masks on weights) and ``prunekit.structured.StructuredSpec`` (masks on channel groups)
    implement it. The Pruner asks ``check_sparsity`` once for the schedule's final sparsity, gathers
    ``gradient_needs`` from the gradients of ``gradient_targets`` after each training step (or calls
    ``statistics`` on its calibration data), and on every prune step applies ``compute_masks`` at the
    schedule's sparsity (``None`` when ``fixed_sparsity`` is set, as for N:M) and reports.
    """

    model: nn.Module

    @property
    def method_name(self) -> str: ...

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the plan fixes whatever the schedule says (N:M patterns), else None."""

    @property
    def gradient_needs(self) -> frozenset[str]:
        """Gradient statistics to gather from training steps (empty: none)."""

    @property
    def gradient_targets(self) -> Sequence[Target]:
        """Whose gradients those statistics are gathered on."""

    def check_sparsity(self, sparsity: float | None) -> float | None: ...

    def statistics(self, data: Iterable | None, loss_fn: LossFn | None, max_batches: int | None = None) -> Any: ...

    def compute_masks(self, sparsity: float | None, stats: Any = None, data: Iterable | None = None) -> Any: ...

    def apply(self, masks: Any) -> list[LayerReport]: ...

    def report(self, sparsity: float | None, rows: list[LayerReport]) -> PruneReport: ...


class PruningSpec:
    """A validated pruning configuration bound to a model.

    Every name, target and shape is checked at construction; ``compute_masks`` changes nothing, and
    ``apply`` only tightens masks.
    """

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        """``PruningSpec(model, options)`` with a :class:`PruningOptions`, or ``PruningSpec(model, method,
        granularity, ..., seed=...)`` with its fields (``data``, ``loss_fn``, ``max_batches`` are then
        read by ``statistics`` when it gets none)."""
        if len(args) == 1 and not kwargs and isinstance(args[0], PruningOptions):
            options = args[0]
        else:
            options = PruningOptions(*args, **kwargs)
        self.options = options
        check_model(model)  # a module with real weights
        method, granularity, scope = options.method, options.granularity, options.scope
        targets, exclude, group_norm = options.targets, options.exclude, options.group_norm
        max_layer_sparsity, seed = options.max_layer_sparsity, options.seed
        model = distributed.unwrap(model)  # a DDP-wrapped model is pruned through the module inside
        self.model = model
        self.criterion = get_criterion(method)
        self.granularity = get_granularity(granularity)
        self.scope = get_scope(scope)
        self.scope_name = scope if isinstance(scope, str) else "per-layer"
        if isinstance(self.granularity, NM):
            self.scope_name = "every block"  # N:M is decided inside each block of M
        if group_norm not in GROUP_NORMS:
            raise ValueError(f"group_norm must be one of {GROUP_NORMS}, got {group_norm!r}")
        self.group_norm = group_norm
        self.max_layer_sparsity = (
            None if max_layer_sparsity is None else check_layer_cap(max_layer_sparsity)
        )
        self.seed = int(seed)
        resolved = resolve_targets(model, targets, exclude)
        self.targets: list[Target] = [t for t in resolved if t.numel() > 0]  # nothing to prune in an empty one
        if not self.targets:
            raise ValueError(f"every target is empty (zero entries): {', '.join(t.name for t in resolved[:3])}")
        for target in self.targets:
            self.granularity.check(target)
        if isinstance(self.scope, PerLayer):  # every pattern of a per-layer dict must hit a target
            self.scope.sparsities([t.name for t in self.targets], None)

    @property
    def method_name(self) -> str:
        return self.criterion.name or type(self.criterion).__name__

    @property
    def fixed_sparsity(self) -> float | None:
        return self.granularity.sparsity if isinstance(self.granularity, NM) else None

    @property
    def gradient_needs(self) -> frozenset[str]:
        return frozenset(self.criterion.needs)

    @property
    def gradient_targets(self) -> list[Target]:
        return self.targets

    def check_sparsity(self, sparsity: float | None) -> float | None:
        if isinstance(self.granularity, NM):
            if sparsity is not None and abs(float(sparsity) - self.granularity.sparsity) > 1e-9:
                raise ValueError(
                    f"the {self.granularity.name} pattern fixes sparsity at {self.granularity.sparsity:g}; "
                    f"got sparsity={sparsity!r} (leave it out)"
                )
            return self.granularity.sparsity
        if sparsity is None:
            if isinstance(self.scope, PerLayer) or getattr(self.scope, "sets_sparsity", False):
                return None
            raise ValueError("sparsity is required (a number in [0, 1))")
        return check_sparsity(sparsity)

    def statistics(
        self, data: Iterable | None, loss_fn: LossFn | None, max_batches: int | None = None
    ) -> dict[str, TargetStatistics] | None:
        """Collect what the criterion needs from ``data`` (None for data-free criteria)."""
        if not self.criterion.needs_data:
            return None
        if data is None:
            raise ValueError(
                f"method {self.method_name!r} is data-driven: pass data= (an iterable of batches) "
                "and, unless the loss is cross-entropy, loss_fn="
            )
        if not self.criterion.needs:  # it reads data= itself in prepare() (OBS: the layers' inputs)
            return None
        if max_batches is None:
            max_batches = self.criterion.default_batches
        stats = collect_gradient_statistics(
            self.model, self.targets, data, loss_fn, self.criterion.needs, max_batches
        )
        distributed.reduce_statistics(stats)  # under DDP: every rank's batches count
        return stats

    def _scores(self, index: int, target: Target, stats) -> Tensor:
        raw = self.criterion.score(
            target, None if stats is None else stats.get(target.name), seed=self.seed, index=index
        )
        if tuple(raw.shape) != target.shape:
            raise ValueError(
                f"criterion {self.method_name!r} returned scores of shape {tuple(raw.shape)} "
                f"for {target.name} of shape {target.shape}"
            )
        return raw

    def compute_masks(
        self, sparsity: float | None, stats: Mapping[str, TargetStatistics] | None = None, data=None
    ) -> dict[str, Tensor]:
        """New keep-masks (``True`` = kept) reaching ``sparsity``; the model is not changed."""
        sparsity = self.check_sparsity(sparsity)
        self.criterion.prepare(self.model, self.targets, stats, data)
        gran, signed = self.granularity, self.criterion.signed
        current = {t.name: t.mask(self.model) for t in self.targets}
        if isinstance(gran, NM):
            return {
                t.name: gran.keep_mask(self._scores(i, t, stats), current[t.name], t)
                for i, t in enumerate(self.targets)
            }

        def group_scores(i: int, t: Target):
            return lambda: gran.reduce(self._scores(i, t, stats), current[t.name], t, self.group_norm, signed)

        layers = [
            LayerScores(t.name, t.shape, gran.num_groups(t), group_scores(i, t), t.parameter.device)
            for i, t in enumerate(self.targets)
        ]
        pruned_groups = self.scope.select(layers, sparsity, self.max_layer_sparsity)
        new = {}
        for target, pruned in zip(self.targets, pruned_groups):
            keep = gran.expand(pruned.logical_not_(), target)
            old = current[target.name]
            new[target.name] = keep if old is None else keep & old
        return new

    def apply(self, new_masks: Mapping[str, Tensor]) -> list[LayerReport]:
        """Tighten the model's masks; returns per-layer before/after sparsities."""
        rows = []
        if distributed.is_distributed():  # rank 0 decides, so every replica keeps the same weights
            new_masks = distributed.broadcast_masks({t.name: new_masks[t.name] for t in self.targets})
        for target in self.targets:  # everything checked before the first mask changes
            mask = new_masks[target.name]
            if tuple(mask.shape) != target.shape:
                raise ValueError(f"{target.name}: new mask of shape {tuple(mask.shape)}, parameter {target.shape}")
        self.criterion.update_weights(self.model, self.targets, new_masks)  # OBS moves the kept weights
        for target in self.targets:
            before = fraction_pruned(target.mask(self.model))
            after_mask = masking.attach(
                self.model, target.name, new_masks[target.name], copy=False, owners=target.owners
            )
            rows.append(LayerReport(target.name, target.shape, target.numel(), before, fraction_pruned(after_mask)))
        warn_emptied([(r.name, r.sparsity_after) for r in rows])
        return rows

    def report(self, sparsity: float | None, rows: list[LayerReport]) -> PruneReport:
        return PruneReport(self.method_name, self.granularity.name, self.scope_name, sparsity, rows)


def check_layer_cap(value) -> float:
    """``max_layer_sparsity`` validated: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"max_layer_sparsity must be in (0, 1], got {value!r}")
    return float(value)


def prune(model: nn.Module, sparsity: float | None = None, **options: Any) -> PruneReport:
    """Prune ``model`` in place with masks and return a report.

    ``sparsity`` is the fraction in [0, 1) of the targets' entries (or groups) to prune, counting what is
    already pruned; nothing pruned comes back. It is fixed by the pattern for N:M granularities. The
    keyword arguments are the fields of :class:`PruningOptions` (``method``, ``granularity``, ``scope``,
    ``targets``, ``exclude``, ``data``, ``loss_fn``, ``group_norm``, ``max_layer_sparsity``, ``seed``,
    ``max_batches``).

    Raises before changing anything when a name, target, shape or value is invalid.
    """
    request = PruningOptions.from_kwargs("prune", options)
    spec = PruningSpec(model, request)
    sparsity = spec.check_sparsity(sparsity)
    rows: list[LayerReport] = []
    for step_sparsity in _round_sparsities(spec, sparsity):  # one round unless the criterion asks for more
        stats = spec.statistics(request.data, request.loss_fn, request.max_batches)
        with torch.no_grad():
            new_masks = spec.compute_masks(step_sparsity, stats, request.data)
            done = spec.apply(new_masks)
        rows = done if not rows else [replace(r, sparsity_before=b.sparsity_before) for r, b in zip(done, rows)]
    return spec.report(sparsity, rows)


options_signature(prune, PruningOptions, [
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module"),
    inspect.Parameter("sparsity", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation="float | None"),
])


def _round_sparsities(spec: PruningSpec, sparsity: float | None) -> list[float | None]:
    """The sparsity after each round: the kept fraction shrinks by the same factor every round, from what
    is kept now to ``1 - sparsity`` (SynFlow's exponential schedule, Tanaka et al. 2020)."""
    rounds = int(spec.criterion.rounds)
    if rounds <= 1 or sparsity is None or isinstance(spec.granularity, NM):
        return [sparsity]
    total = sum(t.numel() for t in spec.targets)
    kept_now = sum(int(m.count_nonzero()) if (m := t.mask(spec.model)) is not None else t.numel() for t in spec.targets)
    start, goal = kept_now / total, 1.0 - sparsity
    if goal >= start:
        return [sparsity]
    return [1.0 - start * (goal / start) ** (k / rounds) for k in range(1, rounds)] + [sparsity]
