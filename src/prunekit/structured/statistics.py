"""Activation statistics of channels, collected once over calibration batches, at one of two points.

* ``"activation"``: the output of an activation function (ReLU, GELU, ...), where Hu et al. count the
  zeros for APoZ. The traced graph is run by a ``torch.fx`` interpreter that reads the output of every
  activation node (functional and module activations alike, even a module called twice).
* ``"input"``: a *tap*, a layer's input dimension that reads channels (the dependency graph records one
  wherever a Linear, a convolution or an attention layer reads a group's channels), i.e. after any
  pooling; read by a forward pre-hook on the layer.

At either point, per index of the channel dimension: the mean absolute value, the fraction of exact
zeros (APoZ), and, when asked, one value per sample (the mean over every other dimension, i.e. global
average pooling for feature maps) for entropy, LDA and correlation criteria. The model runs in eval
mode without gradients; every module gets its mode back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import eval_mode
from ..statistics import move_to, split_batch

__all__ = [
    "TapStatistics", "collect_activation_statistics", "collect_output_statistics", "is_activation",
    "MEASURING_POINTS",
]

#: where activation criteria read a channel: the activation function's output, or the next layer's input
MEASURING_POINTS = ("activation", "input")

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.LogSigmoid, nn.Threshold,
)
_ACTIVATION_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.prelu, F.elu, F.celu, F.selu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.softplus, F.logsigmoid,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


def is_activation(node: fx.Node, model: nn.Module) -> bool:
    """Whether ``node`` of ``model``'s traced graph applies an element-wise activation function."""
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


@dataclass
class TapStatistics:
    """Running statistics of one tapped dimension (``n`` indices)."""

    rows: int = 0
    abs_sum: Tensor | None = None
    zeros: Tensor | None = None
    samples: list[Tensor] = field(default_factory=list)  # (batch, n) per batch
    labels: list[Tensor] = field(default_factory=list)

    @property
    def mean_abs(self) -> Tensor:
        return self.abs_sum / max(self.rows, 1)

    @property
    def apoz(self) -> Tensor:
        """Average percentage of zeros (Hu et al. 2016), in [0, 1]."""
        return self.zeros / max(self.rows, 1)

    def per_sample(self) -> Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0)

    def sample_labels(self) -> Tensor:
        return torch.cat(self.labels) if self.labels else torch.empty(0, dtype=torch.long)

    def add(self, x: Tensor, dim: int, per_sample: bool, labels: Tensor | None) -> None:
        """Accumulate one batch's tensor ``x``, whose dimension ``dim`` holds the indices."""
        d = dim % x.ndim
        n = x.shape[d]
        moved = x.detach().movedim(d, -1)
        rows = moved.reshape(-1, n).float()
        abs_sum = rows.abs().sum(0).cpu()  # labels and scores live on the CPU
        zeros = (rows == 0).sum(0).float().cpu()
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.zeros = zeros if self.zeros is None else self.zeros + zeros
        self.rows += rows.shape[0]
        if per_sample and x.ndim >= 2 and d != 0:
            self.samples.append(moved.reshape(x.shape[0], -1, n).float().mean(1).cpu())
            if labels is not None:
                self.labels.append(labels.reshape(-1).cpu())


def _run_batches(model: nn.Module, data: Iterable, max_batches: int | None,
                 forward: Callable[[tuple, dict, Tensor | None], None]) -> None:
    """``forward(args, kwargs, labels)`` for every calibration batch, in eval mode without gradients."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    with eval_mode(model), torch.no_grad():
        seen = 0
        for batch in islice(data, max_batches):
            args, kwargs, labels = split_batch(batch)
            forward(move_to(args, device), move_to(kwargs, device), labels)
            seen += 1
        if seen == 0:
            raise ValueError("the calibration data yielded no batch")


def collect_activation_statistics(
    model: nn.Module,
    taps: Sequence[tuple[str, int]],
    data: Iterable,
    *,
    per_sample: bool = False,
    max_batches: int | None = None,
) -> dict[tuple[str, int], TapStatistics]:
    """Statistics of the first input of each ``(module name, dim)`` in ``taps`` over ``data``."""
    modules = dict(model.named_modules())
    stats = {tap: TapStatistics() for tap in taps}
    by_module: dict[str, list[int]] = {}
    for name, dim in taps:
        if name not in modules:
            raise ValueError(f"no module {name!r} to collect activations from")
        by_module.setdefault(name, []).append(dim)
    current_labels: list[Tensor | None] = [None]

    def make_hook(name: str):
        def hook(module, args):
            if args and isinstance(args[0], Tensor):
                for dim in by_module[name]:
                    stats[(name, dim)].add(args[0], dim, per_sample, current_labels[0])

        return hook

    def forward(args, kwargs, labels):
        current_labels[0] = labels
        model(*args, **kwargs)

    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in by_module]
    try:
        _run_batches(model, data, max_batches, forward)
    finally:
        for h in handles:
            h.remove()
    return stats


class _Recorder(fx.Interpreter):
    """Runs a traced graph and feeds the outputs of chosen nodes to their statistics."""

    def __init__(self, module: fx.GraphModule, points: Mapping[str, Sequence[int]], stats, per_sample: bool) -> None:
        super().__init__(module)
        self.points, self.stats, self.per_sample = points, stats, per_sample
        self.labels: Tensor | None = None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.points and isinstance(out, Tensor):
            for dim in self.points[n.name]:
                self.stats[(n.name, dim)].add(out, dim, self.per_sample, self.labels)
        return out


def collect_output_statistics(
    model: nn.Module,
    graph: fx.Graph,
    points: Sequence[tuple[str, int]],
    data: Iterable,
    *,
    per_sample: bool = False,
    max_batches: int | None = None,
) -> dict[tuple[str, int], TapStatistics]:
    """Statistics of the output of each ``(node name, dim)`` in ``points`` of ``model``'s traced ``graph``."""
    stats = {point: TapStatistics() for point in points}
    by_node: dict[str, list[int]] = {}
    for name, dim in points:
        by_node.setdefault(name, []).append(dim)
    # a copy of the graph: the module built around it must not take over the dependency graph's own
    recorder = _Recorder(fx.GraphModule(model, copy.deepcopy(graph)), by_node, stats, per_sample)
    placeholders = [n for n in recorder.module.graph.nodes if n.op == "placeholder"]

    def forward(args, kwargs, labels):
        ordered, rest = [], list(args)
        for p in placeholders:
            if rest:
                ordered.append(rest.pop(0))
            elif p.target in kwargs:
                ordered.append(kwargs[p.target])
            elif p.args:
                ordered.append(p.args[0])
            else:
                raise ValueError(f"the calibration batch gives no value for the model's argument {p.target!r}")
        recorder.labels = labels
        recorder.run(*ordered)

    _run_batches(model, data, max_batches, forward)
    return stats
