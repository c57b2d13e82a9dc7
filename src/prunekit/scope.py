"""Where the budget goes: how many groups each target loses.

Every scope ends in the same primitive: prune the ``k`` lowest scores, ties broken by (target order,
flat index), so results are deterministic. Global selection never concatenates the scores: it finds the
exact k-th smallest score with a two-pass radix select over 16-bit histograms of the scores' order-
preserving integer keys, one target (and one chunk) at a time. Extra memory is one target's scores plus a
chunk of keys, whatever the model's size.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .granularity import num_to_prune
from .modules import matches
from .registry import Registry

__all__ = ["LayerScores", "Cut", "SCOPES", "get_scope", "kth_cut", "per_layer_cuts", "erk_sparsities", "lamp_scores"]

_CHUNK = 1 << 18  # elements per chunk when computing keys: bounds temporary memory
_BINS = 1 << 16
_INT32_MIN = -(1 << 31)


@dataclass
class LayerScores:
    """One target as the scope sees it: a name, its shape, and a way to (re)compute its group scores."""

    name: str
    shape: tuple[int, ...]
    num_groups: int
    scores: Callable[[], Tensor]  # 1-D float group scores, -inf for groups already pruned
    device: torch.device = torch.device("cpu")


@dataclass(frozen=True)
class Cut:
    """Prune every score whose key is below ``key``, plus the first ``ties`` scores equal to it."""

    key: int
    ties: int

    def prune_mask(self, layer: LayerScores) -> Tensor:
        """The layer's decision (``True`` = prune), written into a tensor allocated *before* the scores
        are computed: the scores' memory is then freed at the top of the heap and reused by the next
        layer, instead of leaving a hole below each long-lived mask."""
        prune = torch.empty(layer.num_groups, dtype=torch.bool, device=layer.device)
        flat = layer.scores().reshape(-1)
        ties_left = self.ties
        for start, keys in _chunks(flat):
            part = prune[start : start + keys.numel()]
            torch.lt(keys, self.key, out=part)
            if ties_left:
                equal = (keys == self.key).nonzero().flatten()[:ties_left]
                part[equal] = True
                ties_left -= equal.numel()
        return prune


NOTHING = Cut(_INT32_MIN, 0)


def order_keys(scores: Tensor, check_nan: bool = False) -> Tensor:
    """Map float scores to int32 keys with the same order (the IEEE-754 sign-magnitude trick)."""
    x = scores.detach().reshape(-1).to(torch.float32) + 0.0  # -0.0 -> +0.0
    if check_nan and torch.isnan(x).any():
        raise ValueError("pruning scores contain NaN (check the weights and the calibration loss)")
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _chunks(scores: Tensor, check_nan: bool = False):
    """(offset, keys) for consecutive chunks of the flattened scores."""
    flat = scores.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield start, order_keys(flat[start : start + _CHUNK], check_nan)


def _first_reaching(hist: Tensor, k: int) -> tuple[int, int]:
    """(bin where the cumulative count first reaches k, count strictly before that bin)."""
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype)).item())
    return b, int(cum[b - 1]) if b else 0


def kth_cut(layers: Sequence[LayerScores], k: int) -> list[Cut]:
    """Per-layer cuts that prune exactly the ``k`` lowest scores over all ``layers`` together."""
    if k <= 0:
        return [NOTHING] * len(layers)
    total = sum(layer.num_groups for layer in layers)
    if k > total:
        raise ValueError(f"cannot prune {k} of {total} groups")
    high = torch.zeros(_BINS, dtype=torch.int64)
    for layer in layers:
        for _, keys in _chunks(layer.scores(), check_nan=True):  # the first pass sees every score
            high += torch.bincount(((keys >> 16) + (_BINS // 2)).long(), minlength=_BINS).cpu()
    hb, below = _first_reaching(high, k)
    low = torch.zeros(_BINS, dtype=torch.int64)
    for layer in layers:
        for _, keys in _chunks(layer.scores()):
            hit = keys[((keys >> 16) + (_BINS // 2)) == hb]
            if hit.numel():
                low += torch.bincount((hit & 0xFFFF).long(), minlength=_BINS).cpu()
    lb, below_low = _first_reaching(low, k - below)
    key = ((hb - _BINS // 2) << 16) | lb
    ties_left = k - below - below_low
    if ties_left == int(low[lb]):  # every score equal to the k-th goes: no ties to hand out
        return [Cut(key + 1, 0)] * len(layers)
    if len(layers) == 1:
        return [Cut(key, ties_left)]
    cuts = []
    for layer in layers:  # hand the ties out in layer order
        equal = sum(int((keys == key).count_nonzero()) for _, keys in _chunks(layer.scores())) if ties_left else 0
        take = min(equal, ties_left)
        ties_left -= take
        cuts.append(Cut(key, take))
    return cuts


def count_pruned(layer: LayerScores, cut: Cut) -> int:
    scores = layer.scores().reshape(-1)
    less = sum(int((keys < cut.key).count_nonzero()) for _, keys in _chunks(scores))
    return less + cut.ties


# --- allocation rules -------------------------------------------------------------------------


def cap_count(cap: float | None, total: int) -> int:
    """The most of ``total`` groups a layer may lose under ``max_layer_sparsity`` (rounded down)."""
    return total if cap is None else math.floor(cap * total + 1e-9)


def per_layer_cuts(layers: Sequence[LayerScores], sparsities: Sequence[float], cap: float | None) -> list[Cut]:
    """Each layer cut at its own sparsity (at most ``cap`` of its groups)."""
    return [
        kth_cut([layer], min(num_to_prune(s, layer.num_groups), cap_count(cap, layer.num_groups)))[0]
        for layer, s in zip(layers, sparsities)
    ]


def _global(layers: Sequence[LayerScores], sparsity: float, cap: float | None) -> list[Cut]:
    """One threshold over all layers; layers that would exceed ``cap`` are held at it and the rest of
    the budget is re-ranked among the others."""
    total = sum(layer.num_groups for layer in layers)
    k = num_to_prune(sparsity, total)
    if cap is None:
        return kth_cut(layers, k)
    fixed: dict[int, Cut] = {}
    while True:
        free = [i for i in range(len(layers)) if i not in fixed]
        budget = k - sum(cap_count(cap, layers[i].num_groups) for i in fixed)
        budget = min(budget, sum(layers[i].num_groups for i in free))
        cuts = dict(zip(free, kth_cut([layers[i] for i in free], max(budget, 0))))
        over = [i for i in free if count_pruned(layers[i], cuts[i]) > cap_count(cap, layers[i].num_groups)]
        if not over:
            if not free and sum(cap_count(cap, l.num_groups) for l in layers) < k:
                warnings.warn(
                    f"max_layer_sparsity={cap:g} caps every layer: the global sparsity stays below {sparsity:g}",
                    stacklevel=4,
                )
            return [fixed.get(i) or cuts[i] for i in range(len(layers))]
        for i in over:
            fixed[i] = kth_cut([layers[i]], cap_count(cap, layers[i].num_groups))[0]


def erk_sparsities(shapes: Sequence[Sequence[int]], sparsity: float, scale: float = 1.0) -> list[float]:
    """Erdős–Rényi-Kernel allocation (Evci et al. 2020): density proportional to sum(shape) / prod(shape),
    scaled to meet the global sparsity; layers that would exceed density 1 stay dense."""
    sizes = [math.prod(s) for s in shapes]
    raw = [(sum(s) / math.prod(s)) ** scale for s in shapes]
    dense: set[int] = set()
    while True:
        budget = (1.0 - sparsity) * sum(sizes) - sum(sizes[i] for i in dense)
        denom = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        eps = budget / denom if denom else 0.0
        newly = {i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0}
        if not newly:
            break
        dense |= newly
    return [0.0 if i in dense else 1.0 - eps * raw[i] for i in range(len(sizes))]


def lamp_scores(scores: Tensor) -> Tensor:
    """LAMP scores (Lee et al. 2021): w_u^2 / sum_{v >= u} w_v^2 over the layer's sorted kept scores.
    The largest score of every layer gets 1, so global LAMP never empties a layer. Pruned entries stay -inf."""
    flat = scores.reshape(-1)
    kept = torch.isfinite(flat)
    values = flat[kept].to(torch.float64)
    ordered, order = torch.sort(values.abs(), stable=True)
    sq = ordered.square()
    suffix = sq.flip(0).cumsum(0).flip(0)
    lamp_sorted = torch.where(suffix > 0, sq / suffix, torch.zeros_like(sq))
    lamp = torch.empty_like(values)
    lamp[order] = lamp_sorted
    out = torch.full_like(flat, float("-inf"))
    out[kept] = lamp.to(flat.dtype)
    return out.reshape(scores.shape)


class Scope:
    """Base: turns layers and a sparsity into per-layer decisions of which groups go."""

    def ranked(self, layers: Sequence[LayerScores]) -> Sequence[LayerScores]:
        """The scores this scope ranks by (the criterion's own, unless the scope transforms them)."""
        return layers

    def cuts(self, layers: Sequence[LayerScores], sparsity: float, cap: float | None) -> list[Cut]:
        raise NotImplementedError

    def select(self, layers: Sequence[LayerScores], sparsity: float | None, cap: float | None) -> Iterator[Tensor]:
        """Per layer in turn, a bool tensor over its groups: ``True`` = prune. Lazy, so that only one
        layer's decision is alive at a time."""
        ranked = self.ranked(layers)
        cuts = self.cuts(ranked, sparsity, cap)
        for layer, cut in zip(ranked, cuts):
            yield cut.prune_mask(layer)


SCOPES: Registry[type[Scope]] = Registry("scope")


@SCOPES.register("global", "one threshold over all targets (exact, memory-light radix select)")
class Global(Scope):
    def cuts(self, layers, sparsity, cap):
        return _global(layers, sparsity, cap)


@SCOPES.register("local", "every target to the same sparsity (uniform)")
class Local(Scope):
    def cuts(self, layers, sparsity, cap):
        return per_layer_cuts(layers, [sparsity] * len(layers), cap)


@SCOPES.register("lamp", "global ranking of layer-adaptive magnitude scores (Lee et al. 2021)")
class Lamp(Scope):
    def ranked(self, layers):
        # LAMP scores need a sort per layer: compute them once, then rank them globally.
        return [
            LayerScores(l.name, l.shape, l.num_groups, (lambda s=lamp_scores(l.scores()): s), l.device)
            for l in layers
        ]

    def cuts(self, layers, sparsity, cap):
        return _global(layers, sparsity, cap)


@SCOPES.register("erk", "Erdős–Rényi-Kernel per-layer densities, prop. to sum(shape)/prod(shape) (Evci et al. 2020)")
class Erk(Scope):
    def cuts(self, layers, sparsity, cap):
        return per_layer_cuts(layers, erk_sparsities([l.shape for l in layers], sparsity), cap)


class PerLayer(Scope):
    """Explicit sparsities: ``{"name or glob": sparsity}``; the first matching pattern wins, targets
    that match none get ``default`` (or stay as they are when it is None)."""

    def __init__(self, table: Mapping[str, float]) -> None:
        self.table = dict(table)
        for pattern, value in self.table.items():
            check_sparsity(value, f"scope[{pattern!r}]")

    def sparsities(self, names: Sequence[str], default: float | None) -> list[float]:
        used = set()
        out = []
        for name in names:
            module = name.rpartition(".")[0]
            hit = next((p for p in self.table if matches(name, p) or matches(module, p)), None)
            if hit is not None:
                used.add(hit)
            out.append(self.table[hit] if hit is not None else (default or 0.0))
        unused = [p for p in self.table if p not in used]
        if unused:
            raise ValueError(f"per-layer scope: {', '.join(map(repr, unused))} matches none of the targets")
        return out

    def cuts(self, layers, sparsity, cap):
        return per_layer_cuts(layers, self.sparsities([l.name for l in layers], sparsity), cap)


def get_scope(scope: str | Mapping[str, float] | Scope) -> Scope:
    """A scope from its name, or a ``{layer pattern: sparsity}`` dict."""
    if isinstance(scope, Scope):
        return scope
    if isinstance(scope, Mapping):
        return PerLayer(scope)
    return SCOPES.get(scope)()


def check_sparsity(value, what: str = "sparsity") -> float:
    """Validate a sparsity: a number in [0, 1) of any real type (Python, numpy, a one-element tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number in [0, 1), got {value!r}")
    if not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{what} must be in [0, 1), got {value!r}")
    return float(value)


def warn_emptied(names_and_fractions: Sequence[tuple[str, float]]) -> None:
    emptied = [name for name, fraction in names_and_fractions if fraction >= 1.0]
    if emptied:
        warnings.warn(
            f"pruned to 100%: {', '.join(emptied)} (these layers now output only their bias); "
            "pass max_layer_sparsity=... to cap every layer",
            stacklevel=4,  # warn_emptied <- PruningSpec.apply <- prune / Pruner.step <- the caller
        )
