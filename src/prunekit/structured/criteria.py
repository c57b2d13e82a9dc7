"""Group criteria: one score per channel of a group (higher = more important = kept).

``l1``/``l2`` read the channel's filter only (Li et al. 2017); ``group_l1``/``group_l2`` aggregate over
*every* parameter slice of the channel, in every member of its group (a filter, its bias, its
normalisation scale and shift, and the next layers' input columns), as DepGraph does.

====================  =============================================================================
``l1`` / ``l2``        sum of |w| / L2 norm of the filter writing the channel (Li et al. 2017)
``group_l1`` / ``_l2`` the same over all parameter slices of the channel (Fang et al. 2023)
``bn_scale``           |gamma| of the channel's normalisation layers (Network Slimming, Liu et al. 2017)
``taylor``             (sum over the channel's slices of w * dL/dw)^2, averaged over batches
                       (Molchanov et al. 2019, first-order group Taylor)
``apoz``               1 - average percentage of zeros of the channel's ReLU output (Hu et al. 2016)
``activation``         mean |activation| of the channel at its activation function's output
``entropy``            entropy of the channel's pooled activations over samples, 10-bin histogram
                       (Luo & Wu 2017)
``lda``                Fisher's discriminant ratio of the channel's pooled activations between the
                       classes: between-class over within-class variance (needs labelled batches)
``similarity``         1 - max cosine similarity of the channel's filter to a filter of larger norm
                       (a zero filter scores 0)
``correlation``        1 - max positive correlation of the channel's activations with a more active
                       channel (negative correlation is information; a constant channel scores 0)
``random``             seeded uniform scores
====================  =============================================================================

Activation criteria read the output of the activation function that follows the channel (``at="activation"``,
the default: Hu et al.'s measuring point), or, with ``at="input"`` (e.g. ``APoZ(at="input")``), where the next
layers read it, after any pooling; averaged over the points that carry the channel. A group that no
activation function reads is measured at the next layers' inputs.
The redundancy criteria (``similarity``, ``correlation``) compare each channel only with channels ranked
above it (by norm or by activity), so of two identical channels one keeps its score and the other gets 0:
pruning removes one copy, not both. Dead channels (a zero filter, a constant activation) score 0 too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..modules import eval_mode
from ..registry import Registry
from ..statistics import LossFn, batch_loss
from .graph import DependencyGraph, Group, Member
from .statistics import (
    MEASURING_POINTS,
    TapStatistics,
    collect_activation_statistics,
    collect_output_statistics,
    is_activation,
)

__all__ = ["GroupCriterion", "GROUP_CRITERIA", "get_group_criterion", "ScoringContext", "channel_reduce"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)
_ENTROPY_BINS = 10


class GroupCriterion:
    """Base class: ``score(group, context)`` returns a float tensor with one score per channel."""

    name: ClassVar[str] = ""
    #: what it reads: "weights", "gradients", "activations", "samples" (per-sample activations),
    #: "labels" (per-sample activations and class labels)
    needs: ClassVar[str] = "weights"

    @property
    def needs_data(self) -> bool:
        return self.needs != "weights"

    def score(self, group: Group, context: ScoringContext) -> Tensor:
        raise NotImplementedError


GROUP_CRITERIA: Registry[type[GroupCriterion]] = Registry("structured method")


def get_group_criterion(method: str | GroupCriterion) -> GroupCriterion:
    if isinstance(method, GroupCriterion):
        return method
    return GROUP_CRITERIA.get(method)()


def _effective(member: Member) -> Tensor:
    t = member.info.tensor.detach()
    if member.info.mask is not None:
        t = t * member.info.mask
    return t


def _rows(member: Member, tensor: Tensor | None = None) -> Tensor:
    """The member's slices as rows: (positions, everything else)."""
    t = _effective(member) if tensor is None else tensor
    moved = t.movedim(member.dim, 0).index_select(0, member.index.to(t.device))
    return moved.reshape(moved.shape[0], -1).float()


def channel_reduce(member: Member, per_position: Tensor, size: int, how: str = "sum") -> Tensor:
    """Reduce per-position values of a member to per-channel values (``sum`` or ``amax``)."""
    out = torch.zeros(size, dtype=per_position.dtype)
    if how == "sum":
        return out.index_add_(0, member.channel, per_position.cpu())
    return out.scatter_reduce_(0, member.channel, per_position.cpu(), "amax", include_self=True)


def _parameters(group: Group) -> list[Member]:
    return [m for m in group.members if m.kind == "parameter" and m.info.tensor.is_floating_point()]


@dataclass
class ScoringContext:
    """Everything criteria may read, computed once per pruning call and shared."""

    graph: DependencyGraph
    data: Iterable | None = None
    loss_fn: LossFn | None = None
    max_batches: int | None = None
    seed: int = 0
    _stats: dict = field(default_factory=dict, repr=False)  # measuring point -> statistics
    _taylor: dict | None = field(default=None, repr=False)

    # --- activations ----------------------------------------------------------------------------
    def _points(self, at: str) -> list[tuple[tuple[str, int], Tensor]]:
        """((name, dim), labels) of every place activations can be read: activation outputs or layer inputs."""
        if at == "input":
            found = {(t.module_name, t.dim): t.labels for t in self.graph.taps if t.module_name is not None}
        else:
            found = {}
            for node in self.graph.fx_graph.nodes:
                labels = self.graph.labels(node) if is_activation(node, self.graph.model) else None
                if isinstance(labels, dict):
                    found.update({(node.name, dim): atoms for dim, atoms in labels.items()})
        return list(found.items())

    def activations(self, per_sample: bool, at: str = "activation") -> dict[tuple[str, int], TapStatistics]:
        """Statistics at every measuring point ``at`` ("activation" or "input"), collected once."""
        stats = self._stats.get(at)
        if stats is None or (per_sample and not any(s.samples for s in stats.values())):
            if self.data is None:
                raise ValueError("this method is data-driven: pass data= (an iterable of calibration batches)")
            points = sorted(key for key, _ in self._points(at))
            if at == "input":
                stats = collect_activation_statistics(self.graph.model, points, self.data, per_sample=per_sample,
                                                      max_batches=self.max_batches)
            else:
                stats = collect_output_statistics(self.graph.model, self.graph.fx_graph, points, self.data,
                                                  per_sample=per_sample, max_batches=self.max_batches)
            self._stats[at] = stats
        return stats

    def group_points(self, group: Group, per_sample: bool = False, at: str = "activation"
                     ) -> list[tuple[Tensor, Tensor, TapStatistics]]:
        """(positions, channel of each position, statistics) for every point ``at`` that carries ``group``'s
        channels. A group that no activation function reads (attention heads, say) falls back to the
        next layers' inputs."""
        for where in ((at, "input") if at == "activation" else (at,)):
            found = []
            for key, labels in self._points(where):
                channel = self.graph.channel_lookup(group, labels)
                pos = (channel >= 0).nonzero().flatten()
                if pos.numel():
                    found.append((pos, channel[pos], key))
            if found:
                stats = self.activations(per_sample, where)
                return [(pos, channel, stats[key]) for pos, channel, key in found]
        raise ValueError(
            f"group {group.name}: no layer module reads its channels, so activation statistics are unavailable"
        )

    def channel_activation(self, group: Group, what: Callable[[TapStatistics], Tensor], per_sample: bool = False,
                           at: str = "activation") -> list[Tensor]:
        """Per point, per-channel values of ``what`` (a per-index statistic), averaged over each channel's indices."""
        out = []
        for pos, channel, stats in self.group_points(group, per_sample, at):
            values = what(stats)[pos]
            total = torch.zeros(group.size).index_add_(0, channel, values.float())
            count = torch.zeros(group.size).index_add_(0, channel, torch.ones(pos.numel()))
            out.append(total / count.clamp_min(1))
        return out

    def channel_samples(self, group: Group, at: str = "activation") -> list[tuple[Tensor, Tensor]]:
        """Per point: (samples x channels pooled activations, sample labels)."""
        out = []
        for pos, channel, s in self.group_points(group, True, at):
            samples = s.per_sample()
            if samples.numel() == 0:
                raise ValueError(f"no per-sample activations were recorded for group {group.name}")
            values = samples[:, pos]
            total = torch.zeros(samples.shape[0], group.size).index_add_(1, channel, values)
            count = torch.zeros(group.size).index_add_(0, channel, torch.ones(pos.numel()))
            out.append((total / count.clamp_min(1), s.sample_labels()))
        return out

    # --- gradients ------------------------------------------------------------------------------
    def taylor(self) -> dict[int, Tensor]:
        """{group index: mean over batches of (sum of w * dL/dw over the channel's slices)^2}."""
        if self._taylor is not None:
            return self._taylor
        if self.data is None:
            raise ValueError("method 'taylor' is data-driven: pass data= (batches of (inputs, labels)) and, "
                             "unless the loss is cross-entropy, loss_fn=")
        groups = self.graph.groups()
        infos = {}
        for g in groups:
            for m in _parameters(g):
                if m.info.tensor.requires_grad:
                    infos[id(m.info)] = m.info
        params = [i.tensor for i in infos.values()]
        index = {id(i): k for k, i in enumerate(infos.values())}
        sums = {g.index: torch.zeros(g.size) for g in groups}
        model = self.graph.model
        batches = 0
        with eval_mode(model):
            for batch in islice(self.data, self.max_batches):
                with torch.enable_grad():
                    loss = batch_loss(model, batch, self.loss_fn)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                for g in groups:
                    gate = torch.zeros(g.size)
                    for m in _parameters(g):
                        k = index.get(id(m.info))
                        if k is None or grads[k] is None:
                            continue
                        product = _rows(m) * _rows(m, grads[k].detach() * (m.info.mask if m.info.mask is not None else 1))
                        gate += channel_reduce(m, product.sum(1), g.size)
                    sums[g.index] += gate.square()
                batches += 1
        if batches == 0:
            raise ValueError("the calibration data yielded no batch")
        self._taylor = {k: v / batches for k, v in sums.items()}
        return self._taylor


def _filters(group: Group) -> list[Member]:
    """The weights that write the channels (a convolution's filters, a Linear's rows): Li et al.'s filters."""
    found = [m for m in _parameters(group) if "out" in m.roles and m.info.tensor.dim() >= 2]  # no biases
    if not found:
        raise ValueError(f"group {group.name} has no layer weight writing its channels; use 'group_l1' or 'group_l2'")
    return found


def _power_sum(members: list[Member], size: int, power: int) -> Tensor:
    total = torch.zeros(size)
    for m in members:
        rows = _rows(m).abs()
        total += channel_reduce(m, (rows if power == 1 else rows.square()).sum(1), size)
    return total


@GROUP_CRITERIA.register("l1", "sum of |w| of the channel's filter (Li et al. 2017)")
class L1(GroupCriterion):
    """Li et al. 2017 ("Pruning Filters for Efficient ConvNets"): ``s_j = sum |F_j|``, the L1 norm of the
    filter (kernel weights, no bias) that writes channel ``j``; the filters of every layer writing it when
    a residual connection ties several."""

    def score(self, group: Group, context: ScoringContext) -> Tensor:
        return _power_sum(_filters(group), group.size, 1)


@GROUP_CRITERIA.register("l2", "L2 norm of the channel's filter (Li et al. 2017's L2 variant)")
class L2(GroupCriterion):
    def score(self, group: Group, context: ScoringContext) -> Tensor:
        return _power_sum(_filters(group), group.size, 2).sqrt()


@GROUP_CRITERIA.register("group_l1", "sum of |w| over every parameter slice of the channel: filter, bias, norm, next layers' inputs (DepGraph, Fang et al. 2023)")
class GroupL1(GroupCriterion):
    """The group-level norm of DepGraph (Fang et al. 2023): every parameter removed with the channel counts
    (its filter and bias, its normalisation scale and shift, the next layers' input columns)."""

    def score(self, group: Group, context: ScoringContext) -> Tensor:
        return _power_sum(_parameters(group), group.size, 1)


@GROUP_CRITERIA.register("group_l2", "sqrt of the sum of w^2 over every parameter slice of the channel (DepGraph, Fang et al. 2023)")
class GroupL2(GroupCriterion):
    def score(self, group: Group, context: ScoringContext) -> Tensor:
        return _power_sum(_parameters(group), group.size, 2).sqrt()


@GROUP_CRITERIA.register("bn_scale", "|gamma| of the channel's normalisation layers (Network Slimming, Liu et al. 2017)")
class BNScale(GroupCriterion):
    def score(self, group: Group, context: ScoringContext) -> Tensor:
        modules = dict(context.graph.model.named_modules())
        norms = [m for m in _parameters(group) if m.attr == "weight" and isinstance(modules.get(m.module_name), _NORMS)]
        if not norms:
            raise ValueError(
                f"method 'bn_scale' needs a normalisation layer with a scale in every group; group {group.name} "
                "has none (exclude its layers, or use another method)"
            )
        total = torch.zeros(group.size)
        for m in norms:
            total += channel_reduce(m, _rows(m).abs().sum(1), group.size)
        return total


@GROUP_CRITERIA.register("taylor", "(sum of w*dL/dw over the channel's slices)^2, mean over batches (Molchanov et al. 2019)")
class GroupTaylor(GroupCriterion):
    needs = "gradients"

    def score(self, group: Group, context: ScoringContext) -> Tensor:
        return context.taylor()[group.index]


class ActivationCriterion(GroupCriterion):
    """A criterion that reads activations, at ``at``: ``"activation"`` (default), the output of the activation
    function that follows the channel (ReLU, GELU, ...); or ``"input"``, where the next layers read it (after
    any pooling). A group that no activation function reads is measured at the next layers' inputs."""

    needs = "activations"

    def __init__(self, at: str = "activation") -> None:
        if at not in MEASURING_POINTS:
            raise ValueError(f"at must be one of {MEASURING_POINTS}, got {at!r}")
        self.at = at

    def __repr__(self) -> str:
        return f"{type(self).__name__}(at={self.at!r})"


@GROUP_CRITERIA.register("apoz", "1 - average percentage of zeros of the channel's ReLU output (Hu et al. 2016)")
class APoZ(ActivationCriterion):
    def score(self, group: Group, context: ScoringContext) -> Tensor:
        per_point = context.channel_activation(group, lambda s: s.apoz, at=self.at)
        return 1.0 - torch.stack(per_point).mean(0)


@GROUP_CRITERIA.register("activation", "mean |activation| of the channel at its activation function's output")
class MeanActivation(ActivationCriterion):
    def score(self, group: Group, context: ScoringContext) -> Tensor:
        return torch.stack(context.channel_activation(group, lambda s: s.mean_abs, at=self.at)).mean(0)


def histogram_entropy(samples: Tensor, bins: int = _ENTROPY_BINS) -> Tensor:
    """Entropy (nats) of each column's values in ``bins`` equal bins between its min and max."""
    low, high = samples.min(0).values, samples.max(0).values
    span = (high - low).clamp_min(1e-12)
    idx = ((samples - low) / span * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(bins, samples.shape[1]).scatter_add_(0, idx, torch.ones_like(samples))
    p = counts / samples.shape[0]
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(0)
    return torch.where(high > low, ent, torch.zeros_like(ent))


@GROUP_CRITERIA.register("entropy", "entropy of the channel's pooled activations over samples, 10 bins (Luo & Wu 2017)")
class Entropy(ActivationCriterion):
    needs = "samples"

    def score(self, group: Group, context: ScoringContext) -> Tensor:
        return torch.stack([histogram_entropy(s) for s, _ in context.channel_samples(group, self.at)]).mean(0)


def fisher_ratio(samples: Tensor, labels: Tensor) -> Tensor:
    """Between-class variance over within-class variance of each column (Fisher's LDA criterion)."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    k = classes.numel()
    counts = torch.zeros(k).index_add_(0, inverse, torch.ones(labels.numel()))
    means = torch.zeros(k, samples.shape[1]).index_add_(0, inverse, samples) / counts[:, None]
    overall = samples.mean(0)
    between = (counts[:, None] * (means - overall).square()).sum(0)
    within = (samples - means[inverse]).square().sum(0)
    return between / within.clamp_min(1e-12)


@GROUP_CRITERIA.register("lda", "between-class / within-class variance of the channel's activations (labelled data)")
class LDA(ActivationCriterion):
    needs = "labels"

    def score(self, group: Group, context: ScoringContext) -> Tensor:
        scores = []
        for samples, labels in context.channel_samples(group, self.at):
            if labels.numel() != samples.shape[0]:
                raise ValueError("method 'lda' needs labelled batches: (inputs, labels)")
            scores.append(fisher_ratio(samples, labels))
        return torch.stack(scores).mean(0)


def ranked_redundancy(vectors: Tensor, rank: Tensor) -> Tensor:
    """Redundancy score of each row: ``1 - max(0, max cos(v_i, v_j))`` over the rows ``j`` ranked above ``i``
    (``rank`` larger = more important); an all-zero row scores 0.

    Only *positive* similarity makes a row redundant: a row pointing the opposite way (a negative
    correlation) carries its own information. A zero row (a dead filter, a constant activation) carries
    none, so it scores 0 with the exact duplicates: these go first.
    """
    norms = vectors.norm(dim=1)
    unit = vectors / norms[:, None].clamp_min(1e-12)
    sim = unit @ unit.t()
    n = vectors.shape[0]
    order = torch.argsort(rank, descending=True, stable=True)
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    above = position[None, :] < position[:, None]  # above[i, j]: j ranked before i
    best = torch.where(above, sim, torch.zeros_like(sim)).amax(1).clamp(0.0, 1.0)
    dead = norms <= 1e-12 * norms.max().clamp_min(1e-30)
    return torch.where(dead, torch.zeros_like(best), 1.0 - best)


@GROUP_CRITERIA.register("similarity", "1 - max cosine similarity of the channel's filter to a filter of larger norm; zero filters 0")
class FilterSimilarity(GroupCriterion):
    """Filter redundancy (the seeds' cosine distance): a channel whose filter points where a stronger filter
    points adds little; a zero filter adds nothing. Of two copies, the weaker (or the later) goes."""

    def score(self, group: Group, context: ScoringContext) -> Tensor:
        members = [m for m in _parameters(group) if "out" in m.roles] or _parameters(group)
        parts = []
        for m in members:
            rows = _rows(m)
            # one vector per channel: concatenate its slices (every channel has the same layout)
            order = torch.argsort(m.channel, stable=True)
            counts = torch.bincount(m.channel, minlength=group.size)
            if counts.min() != counts.max():
                continue
            per_channel = rows[order].reshape(group.size, -1)
            parts.append(per_channel)
        if not parts:
            raise ValueError(f"group {group.name}: its filters do not have one layout, similarity is undefined")
        vectors = torch.cat(parts, 1)
        return ranked_redundancy(vectors, vectors.norm(dim=1))


@GROUP_CRITERIA.register("correlation", "1 - max positive correlation of the channel's activations with a more active channel")
class ActivationCorrelation(ActivationCriterion):
    """Activation redundancy (the seeds' correlation matrix): strongly *positively* correlated channels are
    redundant, so the less active one scores low; negatively correlated channels carry complementary
    information and keep their score; a constant channel (no variance, e.g. dead) scores 0."""

    needs = "samples"

    def score(self, group: Group, context: ScoringContext) -> Tensor:
        scores = []
        for samples, _ in context.channel_samples(group, self.at):
            centred = samples - samples.mean(0)
            scores.append(ranked_redundancy(centred.t(), samples.abs().mean(0)))
        return torch.stack(scores).mean(0)


@GROUP_CRITERIA.register("random", "uniform random scores, seeded: the baseline")
class RandomScores(GroupCriterion):
    def score(self, group: Group, context: ScoringContext) -> Tensor:
        generator = torch.Generator().manual_seed(context.seed * 1_000_003 + group.index)
        return torch.rand(group.size, generator=generator)


def describe() -> list[tuple[str, str]]:
    """(name, summary) of every group criterion, for ``prunekit methods``."""
    return list(GROUP_CRITERIA.items())



# --- second-order Taylor (Molchanov et al. 2019), a self-contained block ---------------------------


def _hessian_diagonal(loss_of, params: list[Tensor], probes: int | None, generator: torch.Generator) -> list[Tensor]:
    """Diagonal of the Hessian of ``loss_of()`` w.r.t. ``params``: Hutchinson's estimator
    ``mean_z z * (H z)`` over ``probes`` Rademacher vectors (unbiased), or exact with ``probes=None``
    (one Hessian-vector product per entry: tiny models and tests only)."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_of(), params, create_graph=True)
        diag = [torch.zeros_like(p) for p in params]
        if probes is None:
            for k, p in enumerate(params):
                for i in range(p.numel()):
                    hv = torch.autograd.grad(grads[k].reshape(-1)[i], params[k], retain_graph=True)[0]
                    diag[k].view(-1)[i] = hv.reshape(-1)[i].detach()
            return diag
        for _ in range(probes):
            zs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
            hvs = torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=True)
            for d, z, hv in zip(diag, zs, hvs):
                d.add_(z * hv.detach() / probes)
    return diag


@GROUP_CRITERIA.register("taylor_so", "(sum w g - 1/2 sum h_ss w^2)^2 over the channel's slices, h = Hessian diagonal (Molchanov et al. 2019, second order)")
class GroupTaylorSecondOrder(GroupCriterion):
    """Second-order Taylor importance of a channel, Hessian-diagonal variant (Molchanov et al. 2019):
    removing the channel's slices ``S`` changes the loss by ``-sum_S g_s w_s + 1/2 sum_S h_ss w_s^2`` to
    second order with a diagonal Hessian, and the importance is its square, averaged over batches:
    ``mean_b (sum_S g_s^(b) w_s - 1/2 sum_S h_ss w_s^2)^2``. ``g^(b)`` is batch ``b``'s gradient; ``h`` is
    the Hessian diagonal of the mean calibration loss, estimated once over all batches with ``probes``
    Hutchinson probes per batch (``probes=None``: exact, one Hessian-vector product per parameter).
    """

    needs = "gradients"

    def __init__(self, probes: int | None = 8) -> None:
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
            raise ValueError(f"probes must be a positive integer or None (exact), got {probes!r}")
        self.probes = probes
        self._cache: tuple[ScoringContext, dict[int, Tensor]] | None = None

    def score(self, group: Group, context: ScoringContext) -> Tensor:
        if self._cache is None or self._cache[0] is not context:
            self._cache = (context, self._all_scores(context))
        return self._cache[1][group.index]

    def _all_scores(self, context: ScoringContext) -> dict[int, Tensor]:
        if context.data is None:
            raise ValueError("method 'taylor_so' is data-driven: pass data= (batches of (inputs, labels))")
        groups = context.graph.groups()
        infos = {id(m.info): m.info for g in groups for m in _parameters(g) if m.info.tensor.requires_grad}
        params = [i.tensor for i in infos.values()]
        index = {key: k for k, key in enumerate(infos)}
        model = context.graph.model
        generator = torch.Generator().manual_seed(context.seed)
        gates: list[dict[int, Tensor]] = []
        diag = [torch.zeros_like(p) for p in params]
        with eval_mode(model):
            for batch in islice(context.data, context.max_batches):
                with torch.enable_grad():
                    grads = torch.autograd.grad(batch_loss(model, batch, context.loss_fn), params, allow_unused=True)
                gates.append(self._reduce(groups, index, [None if g is None else g.detach() for g in grads]))
                h = _hessian_diagonal(lambda b=batch: batch_loss(model, b, context.loss_fn), params, self.probes,
                                      generator)
                for d, hb in zip(diag, h):
                    d.add_(hb)
        if not gates:
            raise ValueError("the calibration data yielded no batch")
        weights = [p.detach() for p in params]  # w^2 h: the curvature term, one per channel
        curvature = self._reduce(groups, index, [d / len(gates) * w for d, w in zip(diag, weights)])
        return {k: torch.stack([(g[k] - 0.5 * curvature[k]).square() for g in gates]).mean(0) for k in curvature}

    @staticmethod
    def _reduce(groups, index, per_param: list[Tensor | None]) -> dict[int, Tensor]:
        """``{group: sum over the channel's slices of w * x}`` for a per-parameter tensor ``x`` (masked
        entries count as zero)."""
        out = {}
        for g in groups:
            total = torch.zeros(g.size)
            for m in _parameters(g):
                k = index.get(id(m.info))
                if k is None or per_param[k] is None:
                    continue
                x = per_param[k] * (m.info.mask if m.info.mask is not None else 1)
                total += channel_reduce(m, (_rows(m) * _rows(m, x)).sum(1), g.size)
            out[g.index] = total
        return out
