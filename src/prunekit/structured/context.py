"""The labelling of one run of a model: recorded ops, channel atoms, and the context a rule sees.

A tracer (``graph.py``'s torch.fx interpreter, or any other that records operations) feeds
:class:`TraceState` one :class:`Op` at a time with its output. An op names what was called (a module, a
function or a tensor method), its arguments as written (values, and *refs* to earlier results; what a
ref is belongs to the tracer: an ``fx.Node``, or any hashable object) and a printable name. The state
runs the op's rule with a :class:`RuleContext`, the only thing rules see: argument values and labels,
atoms, pins, parameter dimensions, and size expressions that can be re-evaluated with fewer channels.
Rules never reach into the state or the tracer.
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
from ._types import NONE, ParamRef, TensorInfo, UnsupportedOperationError
from .rules import find_rule

__all__ = ["Op", "Atoms", "Tap", "Call", "TraceState", "RuleContext", "index_tensors", "map_tensors"]


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


class RuleContext:
    """What a rule sees: the op, its argument values and labels, the output value, and the helpers
    that create atoms, make them equal, pin them and record parameter dimensions."""

    def __init__(self, state: TraceState, op: Op, output: Any, ref: Any = None) -> None:
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
