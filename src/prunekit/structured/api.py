"""``prunekit.structured.prune`` and friends: choose channels by a group criterion and remove them.

    pk.structured.prune(model, x, ratio=0.5, method="l1", scope="local")        # physical, in place
    pk.structured.prune(model, x, 0.5, method="taylor", scope="global", data=loader, round_to=8)
    pk.structured.prune(model, x, {"layer1.*": 0.3, "layer3.*": 0.6})          # per-layer ratios
    pk.structured.remove(model, x, "features.0", [3, 7])                       # explicit channels
    pk.structured.remove_dead(model, x)                                        # after unstructured pruning

Everything is validated (names, ratios, data, the graph) before the model changes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import masking
from ..modules import call_model, check_model, eval_mode, matches
from ..pruning import options_from_kwargs, options_signature
from ..registry import unknown_name_message
from ..scope import check_sparsity
from ..statistics import LossFn
from .criteria import GroupCriterion, ScoringContext, get_group_criterion
from .graph import DependencyGraph, Group
from .hf_io import mlp_layers, sync_config
from .surgery import channel_masks, remove_channels
from .undo import all_or_nothing

__all__ = [
    "prune",
    "remove",
    "remove_dead",
    "select_channels",
    "StructuredReport",
    "GroupReport",
    "SCOPES",
    "StructuredOptions",
    "check_round_to",
    "vector_round_to",
]

SCOPES = ("local", "global")


@dataclass(frozen=True)
class GroupReport:
    name: str
    channels_before: int
    channels_after: int
    removed: tuple[int, ...]


@dataclass
class StructuredReport:
    """What a structured pruning call removed, group by group."""

    method: str
    scope: str
    ratio: float | Mapping[str, float] | None
    physical: bool
    params_before: int
    params_after: int
    groups: list[GroupReport] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)

    @property
    def channels_removed(self) -> int:
        return sum(g.channels_before - g.channels_after for g in self.groups)

    @property
    def channel_fraction(self) -> float:
        """Fraction of the prunable channels removed."""
        total = sum(g.channels_before for g in self.groups)
        return self.channels_removed / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "scope": self.scope,
            "ratio": dict(self.ratio) if isinstance(self.ratio, Mapping) else self.ratio,
            "physical": self.physical,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "channel_fraction": self.channel_fraction,
            "groups": [g.__dict__ | {"removed": list(g.removed)} for g in self.groups],
            "layers": list(self.layers),
        }

    def __str__(self) -> str:
        width = max([len(g.name) for g in self.groups] + [5])
        action = "removed" if self.physical else "masked"
        lines = [
            f"structured pruning ({self.method}, {self.scope}): {action} {self.channels_removed} channels "
            f"({self.channel_fraction:.1%}); parameters {self.params_before:,} -> {self.params_after:,}",
            f"{'group':<{width}}  {'before':>7}  {'after':>7}",
        ]
        for g in self.groups:
            lines.append(f"{g.name:<{width}}  {g.channels_before:>7}  {g.channels_after:>7}")
        return "\n".join(lines)


def _count(model: nn.Module) -> int:
    """Parameters the forward pass uses: every entry, less the masked ones."""
    with torch.no_grad():
        return sum(int(t.count_nonzero()) if masking.get_mask(model, n) is not None else t.numel()
                   for n, t in masking.named_effective_tensors(model))


def vector_round_to() -> int:
    """Float32 lanes of this CPU's widest vector unit that torch uses (16 with AVX-512, 8 with AVX2, else
    4): the ``round_to`` that ``"auto"`` means, so that kept channel counts fill whole vectors."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return 16 if "AVX512" in capability else 8 if "AVX2" in capability else 4


def check_round_to(round_to) -> int | None:
    """``round_to`` validated: None, a positive integer, or ``"auto"`` (:func:`vector_round_to`)."""
    if round_to is None:
        return None
    if round_to == "auto":
        return vector_round_to()
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer or 'auto', got {round_to!r}")
    return round_to


def _group_matches(group: Group, pattern: str) -> bool:
    return any(matches(n, pattern) for n in group.producers or group.layers)


def _ratios(groups: list[Group], ratio) -> list[float]:
    """The ratio of each group: one number, or {pattern: ratio} matched against the group's layers."""
    if isinstance(ratio, Mapping):
        values = {p: check_sparsity(r, f"ratio[{p!r}]") for p, r in ratio.items()}
        out, used = [], set()
        for g in groups:
            found = next((p for p in values if _group_matches(g, p)), None)
            if found is not None:
                used.add(found)
            out.append(values[found] if found is not None else 0.0)
        unused = [p for p in values if p not in used]
        if unused:
            names = sorted({n for g in groups for n in (g.producers or g.layers)})
            raise ValueError(f"ratio pattern {unused[0]!r} matches no prunable group (groups are written by: "
                             f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''})")
        return out
    return [check_sparsity(ratio, "ratio")] * len(groups)


def _round_keep(keep: int, size: int, round_to: int | None, minimum: int) -> int:
    if round_to and size >= round_to:
        keep = max(round_to, int(math.floor(keep / round_to + 0.5)) * round_to)
        if keep > size:
            keep = size // round_to * round_to
    return min(size, max(keep, minimum))


def select_channels(
    groups: Sequence[Group],
    scores: Sequence[Tensor],
    ratio: float | Mapping[str, float],
    scope: str = "local",
    *,
    round_to: int | str | None = None,
    min_channels: int = 1,
    already: Sequence[Tensor] | None = None,
) -> dict[int, Tensor]:
    """Channels to remove per group (``{group index: channels}``), lowest scores first.

    ``ratio`` is the fraction of each group's channels to remove (``local``), or of all channels with
    scores normalised by their group's mean (``global``: a group of large filters does not lose to a
    group of small ones just by scale); a mapping gives per-layer ratios (local). ``already`` marks
    channels removed before (they count toward the ratio and stay removed). No group keeps fewer than
    ``min_channels`` (never zero), and with ``round_to`` every group keeps a multiple of it.
    """
    if scope not in SCOPES:
        raise ValueError(unknown_name_message("structured scope", scope, SCOPES))
    if scope == "global" and isinstance(ratio, Mapping):
        raise ValueError("per-layer ratios ({pattern: ratio}) need scope='local'")
    round_to = check_round_to(round_to)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be a positive integer, got {min_channels!r}")
    sizes = [g.size for g in groups]
    done = [torch.zeros(n, dtype=torch.bool) if already is None else already[i].cpu() for i, n in enumerate(sizes)]
    keyed = []
    for s, d in zip(scores, done):
        s = s.detach().float().cpu().clone()
        if torch.isnan(s).any():
            raise ValueError("channel scores contain NaN (check the weights and the calibration loss)")
        s[d] = -math.inf
        keyed.append(s)
    floor = [min(n, max(min_channels, round_to if round_to and n >= round_to else 1)) for n in sizes]
    if scope == "local":
        ratios = _ratios(list(groups), ratio)
        remove_counts = []
        for n, r, d, lo in zip(sizes, ratios, done, floor):
            keep = _round_keep(n - int(math.floor(r * n + 0.5)), n, round_to, lo)
            remove_counts.append(max(n - keep, int(d.sum()) if n - int(d.sum()) >= lo else n - lo))
    else:
        r = check_sparsity(ratio, "ratio")
        normalised = []
        for s, d, n, lo in zip(keyed, done, sizes, floor):
            live = s[~d]
            mean = live.abs().mean() if live.numel() else torch.tensor(1.0)
            mean = mean if mean > 0 else torch.tensor(1.0)
            z = s / mean
            # the lowest (n - lo) are candidates; the top lo can never go
            order = torch.argsort(z, stable=True)
            capped = z.clone()
            capped[order[n - lo:]] = math.inf
            normalised.append(capped)
        flat = torch.cat(normalised)
        total = int(math.floor(r * sum(sizes) + 0.5))
        total = min(total, int(torch.isfinite(flat).sum()) + int((flat == -math.inf).sum()))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        if total > 0:
            order = torch.argsort(flat, stable=True)[:total]
            chosen[order] = True
        remove_counts, start = [], 0
        for n, lo in zip(sizes, floor):
            k = int(chosen[start:start + n].sum())
            keep = _round_keep(n - k, n, round_to, lo)
            remove_counts.append(n - keep)
            start += n
    out = {}
    for g, s, k in zip(groups, keyed, remove_counts):
        if k > 0:
            out[g.index] = torch.argsort(s, stable=True)[:k].sort().values
    return out


def _output_shapes(model: nn.Module, example_inputs: Any) -> list:
    with eval_mode(model), torch.no_grad():
        out = call_model(model, example_inputs)
    shapes = []

    def walk(o):
        if isinstance(o, Tensor):
            shapes.append(tuple(o.shape))
        elif isinstance(o, (tuple, list)):
            for v in o:
                walk(v)
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)

    walk(out)
    return shapes


def _apply(graph: DependencyGraph, removal: dict[int, Tensor], physical: bool, example_inputs: Any) -> list[str]:
    """Mask or remove the channels; all or nothing: if any step raises, the model is restored."""
    model = graph.model
    if not physical:
        changed = []
        masks = channel_masks(graph, removal)
        written = [info.tensor for info in graph.tensors if info.name in masks]  # attach zeroes them
        with all_or_nothing(model, written), torch.no_grad():
            for name, keep in masks.items():
                masking.attach(model, name, keep, copy=False)
                changed.append(name.rpartition(".")[0])
        return sorted(set(changed))
    before = _output_shapes(model, example_inputs)
    mlp = mlp_layers(model)
    with all_or_nothing(model):
        changed = remove_channels(graph, removal)
        sync_config(model, mlp)  # a transformers model's config follows (a no-op for other models)
        after = _output_shapes(model, example_inputs)
        if before != after:  # a bug in a rule, never expected: say so loudly (the model is restored)
            raise RuntimeError(f"structured surgery changed the model's output shapes {before} -> {after}; "
                               "please report this model")
    return changed


def _report(method: str, scope: str, ratio, physical: bool, graph_groups: list[Group], removal, before: int,
            model: nn.Module, layers: list[str]) -> StructuredReport:
    rows = [
        GroupReport(g.name, g.size, g.size - len(removal.get(g.index, ())), tuple(removal.get(g.index, torch.empty(0)).tolist()))
        for g in graph_groups
    ]
    return StructuredReport(method, scope, ratio, physical, before, _count(model), rows, layers)


def masked_channels(group: Group) -> Tensor:
    """Channels of ``group`` whose every parameter slice is masked out (by channel masks)."""
    done = torch.ones(group.size, dtype=torch.bool)
    any_param = False
    for m in group.members:
        if m.kind != "parameter":
            continue
        any_param = True
        if m.info.mask is None:
            return torch.zeros(group.size, dtype=torch.bool)
        rows = m.info.mask.movedim(m.dim, 0).index_select(0, m.index.to(m.info.mask.device)).reshape(m.index.numel(), -1)
        kept = rows.any(1).cpu().float()
        alive = torch.zeros(group.size).scatter_reduce_(0, m.channel, kept, "amax", include_self=True)
        done &= alive == 0
    return done if any_param else torch.zeros(group.size, dtype=torch.bool)


def score_groups(
    graph: DependencyGraph, criterion: GroupCriterion, context: ScoringContext
) -> list[Tensor]:
    scores = []
    for g in graph.groups():
        s = criterion.score(g, context)
        if s.shape != (g.size,):
            raise ValueError(f"method {criterion.name!r} returned {tuple(s.shape)} scores for group {g.name} "
                             f"of {g.size} channels")
        scores.append(s)
    return scores


def _check_data(criterion: GroupCriterion, data) -> None:
    if criterion.needs_data and data is None:
        raise ValueError(
            f"method {criterion.name!r} is data-driven: pass data= (an iterable of calibration batches"
            + (", (inputs, labels)" if criterion.needs in ("labels", "gradients") else "") + ")"
        )


@dataclass(frozen=True)
class StructuredOptions:
    """How to choose channels: the one description shared by :func:`prune` and ``StructuredSpec`` (their
    keyword arguments are these fields).

    Attributes:
        method: a group criterion (``prunekit methods`` lists them): ``l1``, ``l2``, ``bn_scale``,
            ``taylor``, ``apoz``, ``activation``, ``entropy``, ``lda``, ``similarity``, ``correlation``,
            ``random``.
        scope: ``"local"`` (the same ratio in every group) or ``"global"`` (one ranking over all
            groups, scores normalised by their group's mean).
        exclude: module names or globs whose parameters keep their shape.
        round_to: keep channel counts multiples of this (8, 16 for fast kernels; ``"auto"``: the CPU's
            float32 vector width, see :func:`vector_round_to`).
        min_channels: no group keeps fewer channels than this (at least 1: a group never empties).
        data, loss_fn, max_batches: calibration batches for data-driven methods.
        seed: seed of the ``random`` method.
        unknown: ``"error"`` or ``"boundary"`` for operations without a rule (see DependencyGraph).
        hidden: also prune the hidden (embedding) width of transformers: every LayerNorm/RMSNorm,
            embedding, tied head and position table over it shrinks (not output-equivalent: the norms'
            statistics change).
    """

    method: str | GroupCriterion = "l1"
    scope: str = "local"
    exclude: Iterable[str] | str = ()
    round_to: int | str | None = None
    min_channels: int = 1
    data: Iterable | None = None
    loss_fn: LossFn | None = None
    max_batches: int | None = None
    seed: int = 0
    unknown: str = "error"
    hidden: bool = False

    def criterion(self) -> GroupCriterion:
        """The group criterion, after validating every option (raises ``ValueError`` on a bad one)."""
        criterion = get_group_criterion(self.method)
        if self.scope not in SCOPES:
            raise ValueError(unknown_name_message("structured scope", self.scope, SCOPES))
        check_round_to(self.round_to)
        return criterion


def prune(model: nn.Module, example_inputs: Any, ratio: float | Mapping[str, float] = 0.5, *,
          physical: bool = True, graph: DependencyGraph | None = None, **options: Any) -> StructuredReport:
    """Remove ``ratio`` of the channels of every coupled group, in place, lowest ``method`` scores first.

    Args:
        example_inputs: a small batch (tensor, tuple of arguments or dict of keyword arguments).
        ratio: fraction of channels to remove, in [0, 1); or ``{layer pattern: ratio}`` per group
            (a group is named by the layers writing its channels; unmatched groups are left alone).
        physical: ``True`` removes channels (surgery); ``False`` attaches channel masks instead, which
            compute the same outputs (every parameter of the group is masked, norm biases included).
        graph: a DependencyGraph of ``model`` already built (it is used up by surgery).
        options: the fields of :class:`StructuredOptions` (``method``, ``scope``, ``exclude``,
            ``round_to``, ``min_channels``, ``data``, ``loss_fn``, ``max_batches``, ``seed``, ``unknown``).

    Returns a :class:`StructuredReport`. The model's outputs keep their shape.
    """
    check_model(model)  # a module with real weights
    request = options_from_kwargs(StructuredOptions, "prune", options)
    criterion = request.criterion()
    method, scope, exclude, round_to = request.method, request.scope, request.exclude, request.round_to
    min_channels, data, loss_fn = request.min_channels, request.data, request.loss_fn
    max_batches, seed, unknown = request.max_batches, request.seed, request.unknown
    if not isinstance(ratio, Mapping):
        check_sparsity(ratio, "ratio")
    _check_data(criterion, data)
    graph = graph or DependencyGraph(model, example_inputs, exclude=exclude, unknown=unknown, hidden=request.hidden)
    groups = graph.groups()
    if not groups:
        raise ValueError("the model has no prunable channel group (see DependencyGraph(...).boundaries())")
    context = ScoringContext(graph, data, loss_fn, max_batches, seed)
    before = _count(model)
    with torch.no_grad():
        scores = score_groups(graph, criterion, context)
    already = [masked_channels(g) for g in groups] if not physical else None
    removal = select_channels(groups, scores, ratio, scope, round_to=round_to, min_channels=min_channels,
                              already=already)
    layers = _apply(graph, removal, physical, example_inputs) if removal else []
    return _report(criterion.name or type(criterion).__name__, scope, ratio, physical, groups, removal, before,
                   model, layers)




options_signature(prune, StructuredOptions, [
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module"),
    inspect.Parameter("example_inputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="Any"),
    inspect.Parameter("ratio", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=0.5,
                      annotation="float | Mapping[str, float]"),
], [inspect.Parameter("physical", inspect.Parameter.KEYWORD_ONLY, default=True, annotation="bool"),
    inspect.Parameter("graph", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="DependencyGraph | None")])


def remove(
    model: nn.Module,
    example_inputs: Any,
    layer: str,
    indices: Sequence[int],
    dim: str = "out",
    *,
    exclude: Iterable[str] | str = (),
    unknown: str = "error",
) -> StructuredReport:
    """Remove the given output (``dim="out"``) or input (``"in"``) channels of ``layer`` and everything
    coupled to them (the next layers' inputs, normalisation, residual partners), in place."""
    if dim not in ("out", "in"):
        raise ValueError(f"dim must be 'out' or 'in', got {dim!r}")
    graph = DependencyGraph(model, example_inputs, exclude=exclude, unknown=unknown)
    removal = graph.channels_of(layer, indices, dim)
    groups = graph.groups()
    for index, channels in removal.items():
        if channels.numel() >= groups[index].size:
            raise ValueError(f"removing {layer}'s {dim}put channels {list(indices)} would empty group "
                             f"{groups[index].name}")
    before = _count(model)
    layers = _apply(graph, removal, True, example_inputs)
    return _report("explicit", layer, None, True, groups, removal, before, model, layers)


def dead_channels(graph: DependencyGraph) -> dict[int, Tensor]:
    """Channels whose removal cannot change the outputs (Han et al. 2015's dead neurons):

    * every layer *reading* the channel has all-zero weights for it (its value is never used), or
    * every layer *writing* it has all-zero weights and bias for it, and what the next layers read
      there is exactly zero (checked on the graph's example inputs; a channel written from zeros is an
      input-independent constant, e.g. a normalisation shift, which is not removable).
    """
    out = {}
    for g in graph.groups():
        inputs = [m for m in g.members if m.kind == "parameter" and "in" in m.roles]
        writers = [m for m in g.members if m.kind == "parameter" and "out" in m.roles]
        in_zero = torch.ones(g.size, dtype=torch.bool)
        for m in inputs:
            amax = _rows_abs_max(m)
            in_zero &= torch.zeros(g.size).scatter_reduce_(0, m.channel, amax, "amax", include_self=True) == 0
        out_zero = torch.ones(g.size, dtype=torch.bool) if writers else torch.zeros(g.size, dtype=torch.bool)
        for m in writers:
            amax = _rows_abs_max(m)
            out_zero &= torch.zeros(g.size).scatter_reduce_(0, m.channel, amax, "amax", include_self=True) == 0
        if out_zero.any():
            read = torch.zeros(g.size)
            tapped = torch.zeros(g.size, dtype=torch.bool)
            for tap in graph.taps:
                channel = graph.channel_lookup(g, tap.labels)
                pos = channel >= 0
                if pos.any():
                    read.scatter_reduce_(0, channel[pos], tap.amax[pos].float(), "amax", include_self=True)
                    tapped[channel[pos]] = True
            out_zero &= tapped & (read == 0)
        dead = in_zero | out_zero
        if dead.all():
            dead[0] = False  # a group never empties
        if dead.any():
            out[g.index] = dead.nonzero().flatten()
    return out


def _rows_abs_max(member) -> Tensor:
    t = member.info.tensor.detach()
    if member.info.mask is not None:
        t = t * member.info.mask
    rows = t.movedim(member.dim, 0).index_select(0, member.index.to(t.device)).reshape(member.index.numel(), -1)
    return rows.abs().amax(1).float().cpu() if rows.shape[1] else torch.zeros(member.index.numel())


def remove_dead(
    model: nn.Module, example_inputs: Any, *, exclude: Iterable[str] | str = (), unknown: str = "error"
) -> StructuredReport:
    """Physically remove dead channels and neurons (see :func:`dead_channels`): typically after
    unstructured pruning, or to turn channel masks (``prune(..., physical=False)``, a structured
    ``Pruner``) into real surgery. Outputs are unchanged."""
    graph = DependencyGraph(model, example_inputs, exclude=exclude, unknown=unknown)
    groups = graph.groups()
    removal = dead_channels(graph)
    before = _count(model)
    layers = _apply(graph, removal, True, example_inputs) if removal else []
    return _report("dead", "local", None, True, groups, removal, before, model, layers)
