"""Small types shared by the graph, the rules and the surgery (no logic, no torch.fx)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = ["TensorInfo", "ParamRef", "UnsupportedOperationError", "NONE"]

#: label of an index that carries no prunable channel (a model input, a constant, a fixed-size dim)
NONE = -1


class UnsupportedOperationError(RuntimeError):
    """The dependency graph met an operation it has no rule for, on a tensor that carries channels."""


@dataclass(eq=False)
class TensorInfo:
    """A parameter or buffer of the model, with the channel labels of its dimensions.

    ``dims[d]`` holds one atom id per index of dimension ``d`` (``NONE`` for an index that is never
    removed); ``roles[d]`` says how the tensor uses the channel there: ``"in"`` (it reads the channel
    into other channels: a layer's input dimension), ``"out"`` (it writes the channel from other
    channels: a layer's output dimension and bias), ``"through"`` (per-channel: norms, depthwise
    filters, scales).
    """

    index: int
    name: str  # user-facing qualified name, e.g. "features.0.weight"
    tensor: Tensor  # the stored tensor (a parametrized parameter's original)
    kind: str  # "parameter" or "buffer"
    owners: list[tuple[str, nn.Module, str]]  # (module name, module, attribute) holding it
    mask: Tensor | None = None  # the prunekit mask buffer of a masked parameter
    dims: dict[int, Tensor] = field(default_factory=dict)
    roles: dict[int, set[str]] = field(default_factory=dict)

    @property
    def module_name(self) -> str:
        return self.owners[0][0]

    @property
    def attr(self) -> str:
        return self.owners[0][2]


@dataclass(eq=False)
class ParamRef:
    """The labels of a parameter or buffer used directly in ``forward`` (a ``get_attr`` node): its
    dimensions get channel labels only when an operation uses them as channels."""

    info: TensorInfo
