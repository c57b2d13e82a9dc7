"""Pruning at initialisation, before any training: SNIP and SynFlow.

Both are ordinary methods of ``prunekit.prune``:

    pk.prune(model, 0.9, method="snip", data=loader)        # one batch of loader
    pk.prune(model, 0.9, method="synflow", data=loader)     # data only gives the input shape
    pk.prune(model, 0.9, method=SynFlow(input_shape=(1, 8, 8)))
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..masking import raw_parameter
from ..statistics import TargetStatistics
from ..targets import Target
from .base import CRITERIA, Criterion, require

__all__ = ["SNIP", "SynFlow"]


@CRITERIA.register("snip", "|g w| / sum |g w| at initialisation, from one batch (SNIP, Lee et al. 2019)")
class SNIP(Criterion):
    """Connection sensitivity (Lee et al. 2019): s_j = |g_j w_j| / sum_k |g_k w_k|.

    ``g`` is the gradient of the loss on one batch (``max_batches=`` uses more: then the mean over
    batches of |g| is taken). ``g_j w_j`` is the derivative of the loss with respect to a multiplicative
    gate c_j on the weight, at c = 1. The normalisation runs over every target, so the scores of all
    layers sum to 1 (it does not change which weights go, only the numbers).
    """

    needs = frozenset({"grad_abs"})
    default_batches = 1

    def __init__(self) -> None:
        self._total: float | None = None

    def _raw(self, target: Target, stats: TargetStatistics | None) -> Tensor:
        grad = require(stats, "grad_abs_sum", self.name, target) / max(stats.count, 1)
        return target.value.detach().abs() * grad

    def prepare(self, model, targets, stats, data=None) -> None:
        if stats is None:
            self._total = None
            return
        total = sum(float(self._raw(t, stats.get(t.name)).sum(dtype=torch.float64)) for t in targets)
        self._total = total if total > 0 else None

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        raw = self._raw(target, stats)
        return raw / self._total if self._total else raw


def _example_shape(data) -> tuple[int, ...] | None:
    """The shape of one input (without the batch dimension) from a tensor, a batch or a loader."""
    if data is None:
        return None
    if isinstance(data, Tensor):
        return tuple(data.shape[1:])
    if isinstance(data, Mapping):
        raise ValueError("synflow needs a tensor input; dict batches (keyword inputs) are not supported")
    if isinstance(data, Sequence) and data and isinstance(data[0], Tensor):
        return tuple(data[0].shape[1:])  # one (inputs, labels) batch
    if isinstance(data, Iterable):
        first = next(iter(data), None)
        if first is None:
            raise ValueError("synflow: the data yielded no batch to take the input shape from")
        return _example_shape(first[0] if isinstance(first, (tuple, list)) else first)
    raise TypeError(f"synflow: cannot take an input shape from {type(data).__name__}")


def _first_layer_shape(model: nn.Module) -> tuple[int, ...] | None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if isinstance(module, nn.modules.conv._ConvNd):
            return None  # the spatial size is unknown
    return None


def _output_tensor(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"synflow: the model returned {type(output).__name__}, not a tensor")


@CRITERIA.register("synflow", "|dR/dw * w|, R = sum of outputs with |weights| on ones; data-free, 100 rounds (Tanaka et al. 2020)")
class SynFlow(Criterion):
    """Iterative synaptic flow pruning (Tanaka et al. 2020), data-free.

    Every round scores S(w) = |dR/dw * w| where R = 1^T (prod_l |W_l|) 1 is the sum of the outputs of
    the network with every parameter and buffer replaced by its absolute value, on an all-ones input;
    ``prune`` runs ``rounds`` rounds (100, as in the paper), the kept fraction shrinking geometrically
    to the target, re-scoring before each. The forward pass runs on a float64 copy of the model in eval
    mode (BatchNorm uses its running statistics, as the reference does), so R does not overflow and the
    model itself, signs included, is never modified.

    Args:
        input_shape: the shape of one input, without the batch dimension. When ``None`` it is taken from
            ``data=`` (only its shape is used), or from the first layer when it is a Linear.
        rounds: pruning rounds.
    """

    def __init__(self, input_shape: Sequence[int] | None = None, rounds: int = 100) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.rounds = rounds
        self._scores: dict[str, Tensor] = {}

    def scores(self, model: nn.Module, targets: Sequence[Target], data=None) -> dict[str, Tensor]:
        """SynFlow scores of ``targets`` (float64, unnormalised), computed on a copy of ``model``."""
        shape = self.input_shape or _example_shape(data) or _first_layer_shape(model)
        if shape is None:
            raise ValueError(
                "synflow needs the input shape: pass data= (only its shape is used) or "
                "method=SynFlow(input_shape=(C, H, W))"
            )
        twin = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            for tensor in [*twin.parameters(), *twin.buffers()]:
                if tensor.is_floating_point():
                    tensor.abs_()
        raw = [raw_parameter(twin.get_submodule(t.module_name), t.param_name) for t in targets]
        device = raw[0].device if raw else torch.device("cpu")
        ones = torch.ones((1, *shape), dtype=torch.float64, device=device)
        with torch.enable_grad():
            try:
                flow = _output_tensor(twin(ones)).sum()
            except RuntimeError as error:
                raise ValueError(
                    f"synflow: an all-ones input of shape {(1, *shape)} does not fit the model ({error}); "
                    "pass data= or method=SynFlow(input_shape=...)"
                ) from None
            grads = torch.autograd.grad(flow, raw, allow_unused=True)
        out = {}
        for t, w, g in zip(targets, raw, grads):
            out[t.name] = torch.zeros_like(w) if g is None else (g * w).abs().detach()
        return out

    def prepare(self, model, targets, stats, data=None) -> None:
        scores = self.scores(model, targets, data)
        top = max((float(s.max()) for s in scores.values() if s.numel()), default=0.0)
        scale = 1.0 / top if top > 0 else 1.0  # the largest score becomes 1: float32 keeps the ranking
        self._scores = {name: (s * scale).float() for name, s in scores.items()}

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        if target.name not in self._scores:
            raise RuntimeError("SynFlow.score called before prepare()")
        return self._scores[target.name].to(target.parameter.device)
