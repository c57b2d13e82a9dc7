"""Sensitivity analysis: how much pruning each layer tolerates alone, and where the budget should go.

:func:`sensitivity` (``pk.sensitivity``) prunes each target layer *alone* at each sparsity of a grid, on
a copy of the model, and records a metric (Han et al., "Learning both Weights and Connections for
Efficient Neural Networks", 2015, Fig. 6; Distiller's ``perform_sensitivity_analysis``). The curves
show which layers are fragile (the first convolution, the classifier) and which can lose almost
everything (large fully connected layers).

:meth:`SensitivityResult.allocate` turns the curves into per-layer sparsities:

* ``allocate(max_loss=0.01)`` (Distiller): every layer at the highest sparsity of the grid whose loss,
  alone, stays within ``max_loss``.
* ``allocate(sparsity=0.9)``: per-layer sparsities that reach the global sparsity ``0.9`` (over the
  analysed layers' entries) at the smallest total loss, taking the losses as additive: a greedy walk
  along each curve's lower convex hull, always taking the step that prunes the most weights per unit
  of loss, the last step interpolated to land on the target exactly. With ``max_loss`` as well, no
  layer goes beyond its ``max_loss`` point (``ValueError`` when the target cannot be reached so).

The result is a ``{layer: sparsity}`` dict, which ``pk.prune(model, scope=allocation)`` applies as it
is; ``result.scope(max_loss=...)`` is a scope object that allocates for whatever sparsity
``pk.prune``/``pk.Pruner`` asks for (so a schedule can use it step after step).

    result = pk.sensitivity(model, lambda m: evaluate(m, val_loader), [0.5, 0.7, 0.8, 0.9, 0.95])
    pk.prune(model, scope=result.allocate(sparsity=0.9))
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import masking
from .granularity import NM
from .modules import fraction_pruned
from .plots import plot_curves
from .pruning import PruningSpec, prune
from .render import Column, Parts, Section, count, image_html, percent, table_html, write_json
from .scope import Scope, check_sparsity, per_layer_cuts

__all__ = ["sensitivity", "SensitivityResult", "SensitivityScope", "allocate", "plot_sensitivity", "report_parts",
           "KIND"]

#: the ``kind`` of a saved analysis (how ``prunekit report`` recognises it)
KIND = "prunekit.sensitivity"


@dataclass
class SensitivityResult:
    """The metric of the model with each layer pruned alone at each sparsity.

    ``curves[layer][i]`` is the metric with ``layer`` at ``sparsities[i]`` and every other layer as it
    was; ``baseline`` is the metric of the model as given; ``sizes`` the entries of each layer.
    """

    sparsities: list[float]
    curves: dict[str, list[float]]
    baseline: float
    sizes: dict[str, int]
    method: str = "magnitude"
    granularity: str = "element"
    higher_is_better: bool = True
    metric: str = "metric"
    extra: dict[str, Any] = field(default_factory=dict)

    def losses(self) -> dict[str, list[float]]:
        """Per layer and sparsity: how much worse than the baseline (positive = worse)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return {name: [sign * (self.baseline - v) for v in values] for name, values in self.curves.items()}

    def allocate(self, sparsity: float | None = None, max_loss: float | None = None) -> dict[str, float]:
        """Per-layer sparsities; see :func:`allocate`."""
        return allocate(self, sparsity, max_loss)

    def scope(self, max_loss: float | None = None) -> SensitivityScope:
        """A scope for ``pk.prune(model, sparsity, scope=...)`` that allocates with these curves."""
        return SensitivityScope(self, max_loss)

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer: its size and the metric at each sparsity (keys ``"50%"``, ...)."""
        return [
            {"layer": name, "size": self.sizes[name],
             **{f"{100 * s:g}%": v for s, v in zip(self.sparsities, values)}}
            for name, values in self.curves.items()
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "sparsities": self.sparsities, "curves": self.curves,
                "baseline": self.baseline, "sizes": self.sizes, "method": self.method,
                "granularity": self.granularity, "higher_is_better": self.higher_is_better,
                "metric": self.metric, "extra": self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityResult:
        try:
            return cls(
                sparsities=[float(s) for s in data["sparsities"]],
                curves={k: [float(v) for v in vs] for k, vs in data["curves"].items()},
                baseline=float(data["baseline"]),
                sizes={k: int(v) for k, v in data["sizes"].items()},
                method=data.get("method", "magnitude"),
                granularity=data.get("granularity", "element"),
                higher_is_better=bool(data.get("higher_is_better", True)),
                metric=data.get("metric", "metric"),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a sensitivity result ({type(error).__name__}: {error})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON (``prunekit report`` reads it)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# --- the analysis -------------------------------------------------------------------------------


def _check_grid(sparsities: Iterable[float]) -> list[float]:
    grid = sorted({check_sparsity(s, "every sparsity of the grid") for s in sparsities})
    grid = [s for s in grid if s > 0.0]
    if not grid:
        raise ValueError("sparsities must hold at least one value in (0, 1)")
    return grid


def sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
    method: str = "magnitude",
    *,
    granularity: str = "element",
    targets: Iterable[str | type[nn.Module]] | str | None = None,
    exclude: Iterable[str] | str = (),
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    max_batches: int | None = None,
    higher_is_better: bool = True,
    metric: str = "accuracy",
    seed: int = 0,
    progress: bool = True,
    console: Any = None,
) -> SensitivityResult:
    """Prune each target alone at each sparsity and record ``evaluate(model)``.

    Runs on one copy of ``model`` (the model itself is never changed): for each target in turn and each
    sparsity of the grid, the target is pruned with ``method``/``granularity`` (``pk.prune`` with a local
    scope, so data-driven methods take ``data``, ``loss_fn`` and ``max_batches`` as there), the copy is
    evaluated, and the target's weights and mask are put back. A target that is already pruned counts
    what it has (pruning to a lower sparsity than it has changes nothing). ``higher_is_better=False``
    for metrics such as loss or perplexity. A rich progress bar shows the ``layers x sparsities``
    evaluations unless ``progress=False``.

    Everything (names, method, granularity, targets, the grid) is checked before the first evaluation.
    """
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a function model -> float, got {type(evaluate).__name__}")
    grid = _check_grid(sparsities)
    work = copy.deepcopy(model)
    spec = PruningSpec(work, method, granularity, "local", targets, exclude, seed=seed)
    if isinstance(spec.granularity, NM):
        raise ValueError(f"granularity {spec.granularity.name!r} fixes the sparsity; sensitivity needs a "
                         "granularity pruned to any sparsity (element, vector, column, kernel, channel)")
    if spec.criterion.needs_data and data is None:
        raise ValueError(f"method {spec.method_name!r} is data-driven: pass data= (calibration batches)")
    names = [t.name for t in spec.targets]
    baseline = _score(evaluate, work, "the unpruned model")
    curves: dict[str, list[float]] = {}
    achieved: dict[str, list[float]] = {}  # each point's real sparsity: an already pruned layer keeps its own

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("sensitivity analysis", total=len(names) * len(grid))
        for name in names:
            saved_values, saved_mask = _snapshot(work, name)
            curve, real = [], []
            for s in grid:
                bar.update(task, description=f"{name} at {s:.0%}")
                prune(work, s, method=method, granularity=granularity, scope="local", targets=[name],
                      data=data, loss_fn=loss_fn, seed=seed, max_batches=max_batches)
                curve.append(_score(evaluate, work, f"{name} at sparsity {s:g}"))
                real.append(fraction_pruned(masking.get_mask(work, name)))
                _restore(work, name, saved_values, saved_mask)
                bar.advance(task)
            curves[name] = curve
            achieved[name] = real
        bar.update(task, description="sensitivity analysis done")
    sizes = {t.name: t.numel() for t in spec.targets}
    extra: dict[str, Any] = {}
    if masking.masks(model):  # analysed from a pruned model: say so, and where each point really is
        extra = {"start_sparsity": masking.sparsity(model), "achieved": achieved}
    return SensitivityResult(grid, curves, baseline, sizes, spec.method_name, spec.granularity.name,
                             higher_is_better, metric, extra)


def _score(evaluate: Callable[[nn.Module], float], model: nn.Module, what: str) -> float:
    value = evaluate(model)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"evaluate must return a number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"evaluate returned {value} for {what}")
    return value


def _owner_param(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, pname = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return masking.raw_parameter(module, pname)


def _snapshot(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    mask = masking.get_mask(model, name)
    return _owner_param(model, name).detach().clone(), None if mask is None else mask.clone()


def _restore(model: nn.Module, name: str, values: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Put a layer back as it was: its stored values and its mask (all kept when it had none)."""
    with torch.no_grad():
        _owner_param(model, name).copy_(values)
        current = masking.get_mask(model, name)
        if current is not None:
            current.copy_(mask) if mask is not None else current.fill_(True)


# --- allocation -----------------------------------------------------------------------------------


def _hull_points(sparsities: Sequence[float], losses: Sequence[float], max_loss: float | None) -> list[tuple[float, float]]:
    """(sparsity, loss) points a layer may stop at: sparsity 0 with no loss, then the grid, losses made
    non-decreasing (pruning more is never taken to help: that is noise), cut at ``max_loss``."""
    points, worst = [(0.0, 0.0)], 0.0
    for s, loss in zip(sparsities, losses):
        worst = max(worst, loss)
        if max_loss is not None and worst > max_loss:
            break
        points.append((s, worst))
    return points


def allocate(result: SensitivityResult, sparsity: float | None = None, max_loss: float | None = None) -> dict[str, float]:
    """Per-layer sparsities from sensitivity curves (see the module's docstring).

    ``sparsity``: the global sparsity to reach over the analysed layers (weighted by their sizes).
    ``max_loss``: no layer beyond the point where its own loss exceeds this (in the metric's units).
    At least one of them is needed.
    """
    if sparsity is None and max_loss is None:
        raise ValueError("allocate needs sparsity= (a global target), max_loss= (a per-layer limit), or both")
    if max_loss is not None and (isinstance(max_loss, bool) or not isinstance(max_loss, (int, float)) or max_loss < 0):
        raise ValueError(f"max_loss must be a number >= 0, got {max_loss!r}")
    losses = result.losses()
    points = {name: _hull_points(result.sparsities, losses[name], max_loss) for name in result.curves}
    if sparsity is None:
        return {name: pts[-1][0] for name, pts in points.items()}
    target = check_sparsity(sparsity) * sum(result.sizes[n] for n in points)
    at = {name: 0 for name in points}  # index into points[name]
    pruned = 0.0
    alloc = {name: 0.0 for name in points}
    while pruned < target - 1e-9:
        best = None
        for name, pts in points.items():
            s0, l0 = pts[at[name]]
            for j in range(at[name] + 1, len(pts)):
                s1, l1 = pts[j]
                gain = result.sizes[name] * (s1 - s0)
                cost = (l1 - l0) / gain
                key = (cost, -gain)
                if best is None or key < best[0]:
                    best = (key, name, j, gain)
        if best is None:
            reachable = sum(result.sizes[n] * alloc[n] for n in alloc) / sum(result.sizes[n] for n in alloc)
            raise ValueError(f"global sparsity {sparsity:g} cannot be reached with every layer within "
                             f"max_loss={max_loss:g}: at most {reachable:.4f}")
        _, name, j, gain = best
        s0 = points[name][at[name]][0]
        s1 = points[name][j][0]
        if pruned + gain > target:  # the last step: stop part-way, on the target
            alloc[name] = s0 + (s1 - s0) * (target - pruned) / gain
            pruned = target
        else:
            alloc[name] = s1
            at[name] = j
            pruned += gain
    return alloc


class SensitivityScope(Scope):
    """``pk.prune(model, sparsity, scope=result.scope())``: each layer gets the sparsity that
    :func:`allocate` gives it for the requested global sparsity (every target must have been analysed)."""

    def __init__(self, result: SensitivityResult, max_loss: float | None = None) -> None:
        if not isinstance(result, SensitivityResult):
            raise TypeError("SensitivityScope needs the result of pk.sensitivity(...)")
        self.result = result
        self.max_loss = max_loss

    def cuts(self, layers, sparsity, cap):
        if sparsity is None:
            raise ValueError("the sensitivity scope needs a global sparsity")
        names = {layer.name for layer in layers}
        missing, extra = sorted(names - set(self.result.curves)), sorted(set(self.result.curves) - names)
        if missing or extra:
            raise ValueError(
                "the sensitivity scope prunes exactly the layers that were analysed"
                + (f"; no curve for {', '.join(missing)}" if missing else "")
                + (f"; analysed but not targeted: {', '.join(extra)}" if extra else "")
            )
        plan = allocate(self.result, sparsity, self.max_loss)
        return per_layer_cuts(layers, [plan[layer.name] for layer in layers], cap)


# --- its report ------------------------------------------------------------------------------------


def as_result(result: SensitivityResult | Mapping[str, Any]) -> SensitivityResult:
    """A :class:`SensitivityResult`, or one read from its dict (a loaded ``sensitivity.json``)."""
    return result if isinstance(result, SensitivityResult) else SensitivityResult.from_dict(result)


def _as_percent(result: SensitivityResult) -> bool:
    values = [result.baseline, *(v for vs in result.curves.values() for v in vs)]
    return result.metric == "accuracy" and all(0.0 <= v <= 1.0 for v in values)


def plot_sensitivity(
    result: SensitivityResult | Mapping[str, Any],
    path: str | os.PathLike,
    title: str = "Sensitivity: each layer pruned alone",
) -> Path:
    """The metric against sparsity with one layer at a time pruned (a :class:`SensitivityResult` or its
    dict), one line per layer (its number of weights in the legend), the unpruned model dotted."""
    result = as_result(result)
    scale = 100.0 if _as_percent(result) else 1.0
    ylabel = result.metric + (" (%)" if scale == 100.0 else "") + ("" if result.higher_is_better else ", lower is better")
    labels = {name: f"{name} ({result.sizes.get(name, 0):,})" for name in result.curves}
    curves = {labels[name]: values for name, values in result.curves.items()}
    start = result.extra.get("start_sparsity")
    achieved = result.extra.get("achieved") or {}
    xs = {labels[name]: achieved.get(name, result.sparsities) for name in result.curves}
    given = "unpruned" if start is None else f"the given model ({start:.1%} sparse)"
    return plot_curves(xs, curves, path, baseline=result.baseline, baseline_label=given,
                       xlabel="real sparsity of the one pruned layer", ylabel=ylabel,
                       title=f"{title} ({result.method}, {result.granularity})", scale=scale)


def _start(result: SensitivityResult) -> str:
    start = result.extra.get("start_sparsity")
    return "unpruned" if start is None else f"the given model ({start:.1%} sparse)"


def _pruned_note(result: SensitivityResult) -> str:
    if result.extra.get("start_sparsity") is None:
        return ""
    return (" The analysis starts from an already pruned model, not a dense one: a layer pruned beyond a point "
            "of the grid stays at its own sparsity, and the plot shows each point at its real sparsity.")


def report_parts(result: SensitivityResult | Mapping[str, Any], out_dir: str | os.PathLike) -> Parts:
    """The report's section of a sensitivity analysis: its curves (``sensitivity.png``, written into
    ``out_dir``) and its table."""
    result = as_result(result)
    png = plot_sensitivity(result, Path(out_dir) / "sensitivity.png")
    cols = [Column("layer"), Column("size", format=count)] + [
        Column(f"{100 * s:g}%", format=percent) if _as_percent(result) else Column(f"{100 * s:g}%")
        for s in result.sparsities]
    section = Section("Sensitivity of each layer", image_html(png, "sensitivity curves") + table_html(result.rows(), cols),
                      note=f"{result.metric} with one layer pruned alone ({result.method}); {_start(result)}: "
                           f"{result.baseline:.4g}. Flat curves can be pruned hard; steep ones are fragile."
                           + _pruned_note(result))
    return Parts(sections=[section], files={"sensitivity_plot": png})
