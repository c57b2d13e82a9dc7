"""The labelling of one run of a model: values, labels and size dependencies of every recorded op.

A tracer feeds :class:`TraceState` the model's inputs, the parameters it reads directly and one
:class:`~prunekit.structured.context.Op` at a time with its output; the state runs each op's rule with a
:class:`~prunekit.structured.context.RuleContext` and keeps the atoms (channel labels and the equalities
between them, a union-find), the parameter dimensions they label, where layers read channels (taps)
and which modules were called.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import masking
from ._types import ParamRef, TensorInfo
from .context import Op, RuleContext, Tap, map_tensors, walk_labels
from .rules import find_rule

__all__ = ["Atoms", "Call", "TraceState", "index_tensors"]


@dataclass(eq=False)
class Call:
    """A module called during the trace, with the labels of its first input and of its output."""

    name: str
    module: nn.Module
    inputs: Any
    outputs: Any

    def input_channels(self) -> Tensor | None:
        """Labels of the channel dimension (1, else 0) of the first input, if it carries channels."""
        if isinstance(self.inputs, dict):
            return self.inputs.get(1, self.inputs.get(0))
        return None


class Atoms:
    """Atoms and the equalities between them (a union-find solved in one vectorised pass)."""

    def __init__(self) -> None:
        self.count = 0
        self._a: list[Tensor] = []
        self._b: list[Tensor] = []
        self.pins: list[tuple[Tensor, str, str]] = []  # (atoms, op name, reason)
        self._roots: Tensor | None = None
        self._fixed: dict[Hashable, Tensor] = {}

    def new(self, n: int) -> Tensor:
        atoms = torch.arange(self.count, self.count + n, dtype=torch.long)
        self.count += n
        self._roots = None
        return atoms

    def fixed(self, key: Hashable, n: int) -> Tensor:
        """Fresh atoms the first time ``key`` is seen, the same ones afterwards (e.g. a layer's heads)."""
        if key not in self._fixed:
            self._fixed[key] = self.new(n)
        return self._fixed[key]

    def union(self, a: Tensor, b: Tensor, op: str = "", reason: str = "") -> None:
        """Make ``a[i]`` and ``b[i]`` the same channel; an atom facing ``NONE`` (an index that never goes)
        is pinned."""
        a, b = torch.broadcast_tensors(a.reshape(-1), b.reshape(-1))
        la, lb = a >= 0, b >= 0
        both = la & lb
        if both.any():
            self._a.append(a[both])
            self._b.append(b[both])
            self._roots = None
        lone = torch.cat([a[la & ~lb], b[lb & ~la]])
        if lone.numel():
            self.pin(lone, op, reason or "meets an index that cannot be removed")

    def pin(self, atoms: Tensor, op: str, reason: str) -> None:
        atoms = atoms.reshape(-1)
        atoms = atoms[atoms >= 0]
        if atoms.numel():
            self.pins.append((atoms.unique(), op, reason))

    def roots(self) -> Tensor:
        """Component id (smallest atom) of every atom."""
        if self._roots is not None and self._roots.numel() == self.count:
            return self._roots
        parent = torch.arange(self.count, dtype=torch.long)
        if self._a:
            a, b = torch.cat(self._a), torch.cat(self._b)
            while True:
                pa, pb = parent[a], parent[b]
                low = torch.minimum(pa, pb)
                new = parent.clone()
                new.scatter_reduce_(0, pa, low, "amin")
                new.scatter_reduce_(0, pb, low, "amin")
                while True:  # pointer jumping: every atom points at its root
                    jumped = new[new]
                    if torch.equal(jumped, new):
                        break
                    new = jumped
                if torch.equal(new, parent):
                    break
                parent = new
        self._roots = parent
        return parent


def index_tensors(model: nn.Module) -> dict[int, TensorInfo]:
    """Every parameter (masked ones by their stored original) and buffer of ``model``, keyed by id."""
    infos: dict[int, TensorInfo] = {}
    index = 0
    for owner_list in masking.parameter_owners(model).values():
        first = owner_list[0]
        raw = masking.raw_parameter(first.module, first.param_name)
        mask = masking.get_mask(model, first.qualified_name, owner_list)
        infos[id(raw)] = TensorInfo(index, first.qualified_name, raw, "parameter",
                                    [(o.module_name, o.module, o.param_name) for o in owner_list], mask)
        index += 1
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (parametrize.ParametrizationList, masking.PruningMask)):
            continue
        for bname, buf in module._buffers.items():
            if buf is None:
                continue
            owner = (module_name, module, bname)
            if id(buf) in infos:
                if all(o[1] is not module or o[2] != bname for o in infos[id(buf)].owners):
                    infos[id(buf)].owners.append(owner)
                continue
            name = f"{module_name}.{bname}" if module_name else bname
            infos[id(buf)] = TensorInfo(index, name, buf, "buffer", [owner])
            index += 1
    return infos


def _is_size_read(op: Op) -> bool:
    return (op.kind == "method" and op.target == "size") or (
        op.kind == "function" and op.target is getattr and len(op.args) > 1 and op.args[1] == "shape"
    )


class _CannotEvaluate(Exception):
    pass


class TraceState:
    """Values, labels and size dependencies of every ref of one run, and the atoms they create.

    ``is_ref`` tells the tracer's refs from literals. A tracer calls :meth:`set_input` for the model's
    inputs, :meth:`set_attribute` for a parameter or buffer read directly, :meth:`record` for every op
    (after :meth:`execute`, or with an output it observed), and :meth:`pin_outputs` for the model's
    outputs. ``users_of(ref)`` may list the ``(op or None, ref)`` of whatever reads a ref (``None``: not
    known, assume used).
    """

    def __init__(self, model: nn.Module, is_ref: Callable[[Any], bool], unknown: str = "error",
                 users_of: Callable[[Any], list[tuple[Op, Any]] | None] | None = None) -> None:
        if unknown not in ("error", "boundary"):
            raise ValueError(f"unknown must be 'error' or 'boundary', got {unknown!r}")
        self.model = model
        self.is_ref = is_ref
        self.unknown = unknown
        self.users_of = users_of or (lambda ref: None)
        self.atoms = Atoms()
        self.infos = index_tensors(model)
        self.taps: list[Tap] = []
        self.calls: list[Call] = []
        self._values: dict[Any, Any] = {}
        self._labels: dict[Any, Any] = {}
        self._taint: dict[Any, frozenset] = {}
        self._size_reads: set = set()
        self._ops: dict[Any, Op] = {}
        self.options: dict[str, Any] = {}  # graph-wide choices rules may read (RuleContext.option)

    # --- values and labels ------------------------------------------------------------------------
    def value(self, arg: Any) -> Any:
        """``arg`` with every ref replaced by its value (through tuples, lists, dicts and slices)."""
        if self.is_ref(arg):
            return self._values[arg]
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.value(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.value(v) for k, v in arg.items()}
        if isinstance(arg, slice):
            return slice(self.value(arg.start), self.value(arg.stop), self.value(arg.step))
        return arg

    def labels(self, arg: Any) -> Any:
        if self.is_ref(arg):
            return self._labels.get(arg, {})
        if isinstance(arg, (list, tuple)):
            return [self.labels(a) for a in arg]
        return {}

    def tensor(self, module: nn.Module, attr: str) -> TensorInfo | None:
        """The TensorInfo of ``module.attr`` (a parameter or buffer), or None when it is absent."""
        if attr in module._buffers:
            buf = module._buffers[attr]
            return None if buf is None else self.infos.get(id(buf))
        try:
            raw = masking.raw_parameter(module, attr)
        except KeyError:
            return None
        return None if raw is None else self.infos.get(id(raw))

    def refs_in(self, arg: Any) -> list:
        """Every ref in a (nested) argument."""
        if self.is_ref(arg):
            return [arg]
        if isinstance(arg, (tuple, list)):
            return [r for a in arg for r in self.refs_in(a)]
        if isinstance(arg, dict):
            return [r for a in arg.values() for r in self.refs_in(a)]
        if isinstance(arg, slice):
            return self.refs_in((arg.start, arg.stop, arg.step))
        return []

    # --- feeding ----------------------------------------------------------------------------------
    def set_input(self, ref: Any, value: Any) -> None:
        self._values[ref] = value
        self._labels[ref] = map_tensors(value, lambda t: {})

    def set_attribute(self, ref: Any, value: Any) -> None:
        """A parameter, buffer or constant that forward() reads directly from the model."""
        self._values[ref] = value
        info = self.infos.get(id(value)) if isinstance(value, Tensor) else None
        self._labels[ref] = ParamRef(info) if info is not None else map_tensors(value, lambda t: {})

    def execute(self, op: Op) -> Any:
        """Run ``op`` on the values of its arguments."""
        args, kwargs = self.value(tuple(op.args)), self.value(dict(op.kwargs))
        if op.kind == "module":
            return op.module(*args, **kwargs)
        if op.kind == "method":
            return getattr(args[0], op.target)(*args[1:], **kwargs)
        return op.target(*args, **kwargs)

    def record(self, ref: Any, op: Op, output: Any) -> None:
        """Label ``output`` (the result of ``op``, known as ``ref`` to later ops) by the op's rule."""
        self._values[ref] = output
        self._ops[ref] = op
        if not isinstance(output, Tensor) and not (
            isinstance(output, (tuple, list)) and any(isinstance(o, Tensor) for o in output)
        ):
            self._taint[ref] = self._taint_of(op, output)
            if _is_size_read(op):
                self._size_reads.add(ref)
        ctx = RuleContext(self, op, output, ref)
        rule = find_rule(op)
        labels = rule(ctx) if rule is not None else ctx.unknown()
        self._labels[ref] = labels
        if op.module is not None:
            self.calls.append(Call(op.target, op.module, ctx.labels(op.args[0]) if op.args else {}, labels))

    def pin_outputs(self, arg: Any, op: str) -> None:
        """The model's outputs keep their size."""
        for ref in self.refs_in(arg):
            lab = self._labels.get(ref)
            if isinstance(lab, ParamRef):
                value = self._values[ref]
                for d in range(value.ndim):
                    if value.shape[d] > 1:
                        if d not in lab.info.dims:
                            lab.info.dims[d] = self.atoms.new(value.shape[d])
                        self.atoms.pin(lab.info.dims[d], op, "reaches the model's output")
            else:
                walk_labels(lab, lambda t, name=getattr(ref, "name", op): self.atoms.pin(
                    t, name, "reaches the model's output"))

    # --- sizes --------------------------------------------------------------------------------------
    def _taint_of(self, op: Op, value: Any) -> frozenset:
        """Which (tensor ref, dim) sizes a non-tensor result depends on, when those dims carry channels."""
        args = op.args
        if _is_size_read(op):
            source = args[0]
            lab = self._labels.get(source, {}) if self.is_ref(source) else {}
            if not isinstance(lab, dict):
                return frozenset()
            dim = args[1] if op.kind == "method" and len(args) > 1 else op.kwargs.get("dim")
            if isinstance(dim, int):
                ndim = self._values[source].ndim
                return frozenset({(source, dim % ndim)}) if dim % ndim in lab else frozenset()
            return frozenset((source, d) for d in lab)
        if op.kind == "method" and op.target == "numel":
            lab = self._labels.get(args[0], {})
            return frozenset((args[0], d) for d in lab) if isinstance(lab, dict) else frozenset()
        if op.kind == "function" and op.target is operator.getitem and self.is_ref(args[0]):
            base = self._taint.get(args[0], frozenset())
            index = args[1]
            source_value = self._values[args[0]]
            if isinstance(source_value, torch.Size) and isinstance(index, int):
                d = index % len(source_value)
                return frozenset(t for t in base if t[1] == d)
            return base
        taint: set = set()
        for ref in self.refs_in((args, op.kwargs)):
            taint.update(self._taint.get(ref, ()))
        return frozenset(taint)

    def size_sources(self, arg: Any, element: int | None = None) -> frozenset:
        """The (tensor ref, dim) channel sizes a size value depends on; ``element`` picks one entry of a
        shape read directly from a tensor (``x.size()``, ``x.shape``)."""
        if not self.is_ref(arg):
            return frozenset()
        taint = self._taint.get(arg, frozenset())
        if element is not None and arg in self._size_reads:
            nd = len(self._values[arg])
            return frozenset(t for t in taint if t[1] == element % nd)
        return taint

    def reevaluate(self, arg: Any, sizes: dict) -> Any:
        """Recompute a size expression with some (tensor ref, dim) sizes replaced by ``sizes``."""
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.reevaluate(a, sizes) for a in arg)
        if not self.is_ref(arg):
            return arg
        if not self._taint.get(arg):
            return self._values[arg]
        op = self._ops.get(arg)
        if op is None:
            raise _CannotEvaluate(repr(arg))
        if _is_size_read(op) or (op.kind == "method" and op.target == "numel"):
            source = op.args[0]
            shape = list(self._values[source].shape)
            for (ref, d), n in sizes.items():
                if ref is source:
                    shape[d] = n
            if op.target == "numel":
                return math.prod(shape)
            dim = op.args[1] if op.kind == "method" and len(op.args) > 1 else op.kwargs.get("dim")
            return torch.Size(shape) if dim is None else shape[dim]
        args = self.reevaluate(tuple(op.args), sizes)
        kwargs = {k: self.reevaluate(v, sizes) for k, v in op.kwargs.items()}
        if op.kind == "function":
            return op.target(*args, **kwargs)
        if op.kind == "method":
            return getattr(args[0], op.target)(*args[1:], **kwargs)
        raise _CannotEvaluate(op.name)
