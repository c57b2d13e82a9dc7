"""What a rule sees: the op (a neutral record of one call) and the context that labels its output.

A tracer (``graph.py``'s torch.fx interpreter, or any other that records operations) describes each call
as an :class:`Op`: what was called (a module, a function or a tensor method), its arguments as written
(values, and *refs* to earlier results; what a ref is belongs to the tracer: an ``fx.Node``, or any
hashable object) and a printable name. The rule of the op gets a :class:`RuleContext`, the only thing
rules see: argument values and labels, atoms, pins, parameter dimensions, and size expressions that can
be re-evaluated with fewer channels. Rules never reach into the trace state (``trace_state.py``) or the
tracer.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._types import NONE, ParamRef, TensorInfo, UnsupportedOperationError

__all__ = ["Op", "Tap", "RuleContext", "map_tensors", "walk_labels"]


@dataclass(eq=False)
class Op:
    """One recorded operation.

    ``kind`` is ``"module"`` (``target``: the module's qualified name, ``module``: the module),
    ``"function"`` (``target``: the callable) or ``"method"`` (``target``: the method name, ``args[0]``
    the tensor it is called on). ``args``/``kwargs`` hold what forward() passed: literals and refs to
    earlier results. ``name`` is unique within the trace.
    """

    kind: str
    target: Any
    args: tuple
    kwargs: dict
    name: str
    module: nn.Module | None = None

    @property
    def module_name(self) -> str | None:
        return self.target if self.kind == "module" else None

    def describe(self) -> str:
        """``module 'features.0'``, ``method .view()``, ``function torch.cat``."""
        if self.kind == "module":
            return f"module {self.target!r}"
        if self.kind == "method":
            return f"method .{self.target}()"
        target = self.target
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
        module = getattr(target, "__module__", None)
        return f"function {module + '.' if module and module != 'builtins' else ''}{name}"


@dataclass(eq=False)
class Tap:
    """Where a layer reads channels: for activation statistics and dead-channel checks."""

    op: str
    module_name: str | None  # the layer reading the channels, when it is a module call
    dim: int
    labels: Tensor
    amax: Tensor  # max |input| per index on the example inputs


def map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``fn`` on every tensor of a (nested) tuple/list; ``None`` for anything else."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return [map_tensors(v, fn) for v in value]
    return None


def walk_labels(labels: Any, fn: Callable[[Tensor], None]) -> None:
    """``fn`` on every atom tensor of a label structure."""
    if isinstance(labels, dict):
        for v in labels.values():
            fn(v)
    elif isinstance(labels, (list, tuple)):
        for v in labels:
            walk_labels(v, fn)


def _has_labels(labels: Any) -> bool:
    if isinstance(labels, ParamRef):
        return True
    if isinstance(labels, dict):
        return bool(labels)
    if isinstance(labels, (list, tuple)):
        return any(_has_labels(v) for v in labels)
    return False


def _amax_except(value: Tensor, dim: int) -> Tensor:
    moved = value.detach().movedim(dim, -1).reshape(-1, value.shape[dim])
    return moved.abs().amax(0).float().cpu() if moved.shape[0] else torch.zeros(value.shape[dim])


class RuleContext:
    """What a rule sees: the op, its argument values and labels, the output value, and the helpers
    that create atoms, make them equal, pin them and record parameter dimensions."""

    def __init__(self, state: Any, op: Op, output: Any, ref: Any = None) -> None:
        """``state`` is the trace's :class:`~prunekit.structured.trace_state.TraceState`; ``ref`` names the
        output for later ops."""
        self._state = state
        self._ref = ref
        self.op = op
        self.module = op.module
        self.module_name = op.module_name
        self.output = output

    # --- arguments ------------------------------------------------------------------------------
    def raw(self, index: int | None, name: str | None = None, default: Any = None) -> Any:
        """The op's argument as written (a ref or a literal), by position or keyword."""
        if index is not None and index < len(self.op.args):
            return self.op.args[index]
        if name is not None and name in self.op.kwargs:
            return self.op.kwargs[name]
        return default

    def value(self, arg: Any) -> Any:
        """The run-time value of an argument (refs replaced by their values)."""
        return self._state.value(arg)

    def arg(self, index: int | None, name: str | None = None, default: Any = None) -> Any:
        return self.value(self.raw(index, name, default))

    def is_ref(self, arg: Any) -> bool:
        """Whether ``arg`` is the result of an earlier op (rather than a literal written in forward())."""
        return self._state.is_ref(arg)

    def labels(self, arg: Any) -> Any:
        """Labels of an argument: a dict {dim: atoms}, a ParamRef, a list for tuples, or {} / None."""
        return self._state.labels(arg)

    def dims(self, arg: Any, what: str = "through") -> dict[int, Tensor]:
        """Labels of a tensor argument as a plain dict (a parameter used directly gets atoms on every
        dimension larger than 1)."""
        lab = self.labels(arg)
        if isinstance(lab, ParamRef):
            value = self.value(arg)
            return {d: self.param(lab.info, d, what) for d in range(value.ndim) if value.shape[d] > 1}
        return lab if isinstance(lab, dict) else {}

    def roots(self) -> Tensor:
        """The component (channel) of every atom made so far: atoms made equal share one."""
        return self._state.atoms.roots()

    def option(self, name: str, default: Any = None) -> Any:
        """A graph-wide choice (``"hidden"``: LayerNorm/RMSNorm follow a removal instead of pinning)."""
        return self._state.options.get(name, default)

    def where(self) -> str:
        return f"{self.op.describe()} at node {self.op.name!r}"

    def output_used(self, index: int) -> bool:
        """Whether element ``index`` of a tuple output is read by a later op (True when not known)."""
        users = self._state.users_of(self._ref)
        if users is None:
            return True
        for user_op, user_ref in users:  # user_op is None for a use that is not an op (the output)
            if user_op is not None and user_op.kind == "function" and user_op.target is operator.getitem and len(user_op.args) > 1 \
                    and user_op.args[1] == index:
                later = self._state.users_of(user_ref)
                if later is None or later:
                    return True
        return False

    # --- sizes computed in forward() --------------------------------------------------------------
    def size_sources(self, arg: Any, element: int | None = None) -> frozenset:
        """The (ref, dim) channel dimensions whose size the size value ``arg`` follows (empty: a size
        written in forward())."""
        return self._state.size_sources(arg, element)

    def reevaluate(self, arg: Any, sizes: dict) -> Any:
        """``arg`` recomputed with the channel dimensions in ``sizes`` ({(ref, dim): new size})."""
        return self._state.reevaluate(arg, sizes)

    # --- atoms ----------------------------------------------------------------------------------
    def new(self, n: int) -> Tensor:
        return self._state.atoms.new(n)

    def atoms_for(self, key: Hashable, n: int) -> Tensor:
        """Atoms that belong to ``key`` (e.g. a layer's heads), the same on every call of the trace."""
        return self._state.atoms.fixed(key, n)

    def union(self, a: Tensor, b: Tensor, reason: str = "") -> None:
        self._state.atoms.union(a, b, self.op.name,
                                reason or f"{self.where()}: meets an index that cannot be removed")

    def pin(self, atoms: Tensor | dict | None, reason: str) -> None:
        if atoms is None:
            return
        if isinstance(atoms, dict):
            for v in atoms.values():
                self.pin(v, reason)
            return
        if isinstance(atoms, ParamRef):
            return  # a parameter not yet used as channels has no atoms to pin
        self._state.atoms.pin(atoms, self.op.name, f"{self.where()}: {reason}")

    def pin_all(self, reason: str) -> None:
        """Pin every label of every argument (a boundary)."""
        for ref in self._state.refs_in((self.op.args, self.op.kwargs)):
            lab = self.labels(ref)
            if isinstance(lab, ParamRef):
                value = self.value(ref)
                for d in range(getattr(value, "ndim", 0)):
                    if value.shape[d] > 1:
                        self.pin(self.param(lab.info, d, "through"), reason)
            else:
                walk_labels(lab, lambda t: self.pin(t, reason))

    def unknown(self) -> Any:
        """No rule for this op: fine on unlabelled inputs; otherwise an error or a boundary."""
        if not _has_labels(self.labels(list(self.op.args) + list(self.op.kwargs.values()))):
            return map_tensors(self.output, lambda t: {})
        if self._state.unknown == "error":
            kind = type(self.module).__name__ if self.module is not None else None
            hint = (
                f"register a rule for {kind} with prunekit.structured.register_rule({kind}, rule)"
                if kind else "write the model with supported operations"
            )
            raise UnsupportedOperationError(
                f"structured pruning has no rule for {self.where()}, which receives channels of prunable "
                f"layers; {hint}, or pass unknown='boundary' to keep the channels it touches"
            )
        self.pin_all("no rule for this operation (boundary)")
        return map_tensors(self.output, lambda t: {})

    # --- parameters -----------------------------------------------------------------------------
    def tensor(self, module: nn.Module, attr: str) -> TensorInfo | None:
        """The TensorInfo of ``module.attr`` (a parameter or buffer), or None when it is absent."""
        return self._state.tensor(module, attr)

    def param(self, info: TensorInfo, dim: int, role: str) -> Tensor:
        """The labels of ``info``'s dimension ``dim``; fresh atoms the first time it is used."""
        if dim not in info.dims:
            info.dims[dim] = self.new(info.tensor.shape[dim])
        info.roles.setdefault(dim, set()).add(role)
        return info.dims[dim]

    def add_role(self, labels: Tensor | None, role: str) -> None:
        """Every parameter dimension labelled exactly ``labels`` takes ``role`` too: the weight of a layer
        that computes it in forward() (a standardised weight) writes (``"out"``) or reads (``"in"``) the
        channels as a layer's weight does."""
        if labels is None:
            return
        for info in self._state.infos.values():
            for dim, atoms in info.dims.items():
                if atoms.shape == labels.shape and torch.equal(atoms, labels):
                    info.roles.setdefault(dim, set()).add(role)

    def consume(self, info: TensorInfo | None, dim: int, labels: Tensor | None, role: str) -> None:
        """``info``'s dimension ``dim`` follows ``labels`` (``None`` = an unlabelled, fixed input)."""
        if info is None:
            return
        size = info.tensor.shape[dim]
        if labels is None:
            labels = torch.full((size,), NONE, dtype=torch.long)
        if labels.numel() != size:
            raise UnsupportedOperationError(
                f"{self.where()}: {info.name} dimension {dim} has size {size} but its input carries "
                f"{labels.numel()} channels"
            )
        info.roles.setdefault(dim, set()).add(role)
        if dim not in info.dims:
            info.dims[dim] = labels.clone()
        else:
            self.union(info.dims[dim], labels)

    def tap(self, value: Tensor, dim: int, labels: Tensor | None) -> None:
        """Record where a layer reads channels (for activation statistics and dead-channel checks)."""
        if labels is None or not isinstance(value, Tensor) or not value.is_floating_point():
            return
        self._state.taps.append(Tap(self.op.name, self.module_name, dim, labels, _amax_except(value, dim)))
