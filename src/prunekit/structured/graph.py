"""The dependency graph: which parameter slices must shrink together when one channel goes.

The model is traced with ``torch.fx`` (layers with parameters stay whole, as ``call_module`` nodes) and
then run once on the example inputs by a small interpreter that carries, beside every tensor, a
*label* for each index of each channel-carrying dimension. Labels are *atoms*: a layer's output
channels (a Linear's or a convolution's filters, an Embedding's features, the heads of a
MultiheadAttention) get fresh atoms; every operation then says, through its rule in ``rules.py``, how
the labels of its inputs map to its outputs (element-wise ops pass them on, a residual add makes the
atoms of its two inputs equal, ``torch.cat`` concatenates them, a flatten repeats each one over the
spatial positions, ...) and which parameter dimensions read or write them. Atoms made equal form
*components*: one component is one channel that can be removed; components touching the same
parameter dimensions form a :class:`Group`.

Nothing is guessed: an operation without a rule that sees labelled tensors raises
:class:`UnsupportedOperationError` naming the op and the node (or, with ``unknown="boundary"``, pins its
inputs), and every operation that mixes channels in a way removal cannot follow (a softmax or a
normalisation over the channels, a slice with constant bounds, a reduction) *pins* them: pinned
channels are never removed. The model's outputs are pinned too, so they keep their size.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import masking
from ._types import NONE, ParamRef, TensorInfo, UnsupportedOperationError

__all__ = ["DependencyGraph", "Group", "Member", "UnsupportedOperationError", "Boundary"]

Labels = dict  # {dim: LongTensor of atom ids}; a tuple output has a list of these


@dataclass(frozen=True)
class Boundary:
    """Channels pinned (never removed) and why."""

    node: str
    reason: str
    channels: int


@dataclass(eq=False)
class Member:
    """One parameter (or buffer) dimension of a group: ``index[k]`` belongs to channel ``channel[k]``."""

    name: str  # "layer1.0.conv1.weight"
    module_name: str
    attr: str
    kind: str  # "parameter" or "buffer"
    dim: int
    roles: frozenset[str]
    index: Tensor
    channel: Tensor
    info: TensorInfo

    def __repr__(self) -> str:
        return f"Member({self.name}, dim={self.dim}, roles={sorted(self.roles)}, {self.index.numel()} indices)"


@dataclass(eq=False)
class Group:
    """Coupled channels: removing channel ``k`` removes ``member.index[member.channel == k]`` along
    ``member.dim`` of every member, all at once."""

    index: int
    name: str  # the first layer writing the channels (its module name), for reports and per-layer ratios
    size: int  # number of channels
    members: list[Member]
    roots: Tensor  # component id of each channel (internal)
    layers: tuple[str, ...]  # every module holding a member, in model order

    @property
    def producers(self) -> tuple[str, ...]:
        """Modules that write the channels (output dimension of a layer)."""
        names = [m.module_name or m.name for m in self.members if "out" in m.roles]
        return tuple(dict.fromkeys(names))

    def slices(self, channels: Sequence[int] | Tensor) -> list[tuple[Member, Tensor]]:
        """``(member, indices along member.dim)`` of the given channels, for every member."""
        chosen = torch.as_tensor(channels, dtype=torch.long).reshape(-1)
        return [(m, m.index[torch.isin(m.channel, chosen)]) for m in self.members]

    def __repr__(self) -> str:
        return f"Group({self.index}, {self.name!r}, {self.size} channels, {len(self.members)} members)"


class _Atoms:
    """Atoms and the equalities between them (a union-find solved in one vectorised pass)."""

    def __init__(self) -> None:
        self.count = 0
        self._a: list[Tensor] = []
        self._b: list[Tensor] = []
        self.pins: list[tuple[Tensor, str, str]] = []  # (atoms, node, reason)
        self._roots: Tensor | None = None

    def new(self, n: int) -> Tensor:
        atoms = torch.arange(self.count, self.count + n, dtype=torch.long)
        self.count += n
        self._roots = None
        return atoms

    def union(self, a: Tensor, b: Tensor, node: str = "", reason: str = "") -> None:
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
            self.pin(lone, node, reason or "meets an index that cannot be removed")

    def pin(self, atoms: Tensor, node: str, reason: str) -> None:
        atoms = atoms.reshape(-1)
        atoms = atoms[atoms >= 0]
        if atoms.numel():
            self.pins.append((atoms.unique(), node, reason))

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


class _Tracer(fx.Tracer):
    """Keeps layers with a rule (and torch.nn's own modules) whole; traces through everything else."""

    def __init__(self, extra_leaves: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.extra_leaves = extra_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from .rules import module_rule

        if isinstance(m, self.extra_leaves) or module_rule(m) is not None:
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _call(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def _map_structure(value: Any, fn) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return [_map_structure(v, fn) for v in value]
    return None


def _has_labels(labels: Any) -> bool:
    if isinstance(labels, ParamRef):
        return True
    if isinstance(labels, dict):
        return bool(labels)
    if isinstance(labels, (list, tuple)):
        return any(_has_labels(v) for v in labels)
    return False


def _node_label(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_module":
        return f"module {target!r}"
    if node.op == "call_method":
        return f"method .{target}()"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    module = getattr(target, "__module__", None)
    return f"function {module + '.' if module and module != 'builtins' else ''}{name}"


class RuleContext:
    """What a rule sees: the node, its argument values and labels, the output value, and the helpers
    that create atoms, make them equal, pin them and record parameter dimensions."""

    def __init__(self, graph: DependencyGraph, node: fx.Node, module: nn.Module | None, output: Any) -> None:
        self.graph = graph
        self.node = node
        self.module = module
        self.module_name = node.target if node.op == "call_module" else None
        self.output = output

    # --- arguments ------------------------------------------------------------------------------
    def raw(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """The node's argument as written (a Node or a literal)."""
        if index is not None and index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def value(self, arg: Any) -> Any:
        """The run-time value of an argument (Nodes replaced by their values)."""
        return self.graph._value(arg)

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        return self.value(self.raw(index, name, default))

    def labels(self, arg: Any) -> Any:
        """Labels of an argument: a dict {dim: atoms}, a ParamRef, a list for tuples, or {} / None."""
        if isinstance(arg, fx.Node):
            return self.graph._labels.get(arg, {})
        if isinstance(arg, (list, tuple)):
            return [self.labels(a) for a in arg]
        return {}

    def dims(self, arg: Any, what: str = "through") -> dict[int, Tensor]:
        """Labels of a tensor argument as a plain dict (a parameter used directly gets atoms on every
        dimension larger than 1)."""
        lab = self.labels(arg)
        if isinstance(lab, ParamRef):
            value = self.value(arg)
            return {d: self.param(lab.info, d, what) for d in range(value.ndim) if value.shape[d] > 1}
        return lab if isinstance(lab, dict) else {}

    def where(self) -> str:
        return f"{_node_label(self.node)} at node {self.node.name!r}"

    # --- atoms ----------------------------------------------------------------------------------
    def new(self, n: int) -> Tensor:
        return self.graph._atoms.new(n)

    def union(self, a: Tensor, b: Tensor, reason: str = "") -> None:
        self.graph._atoms.union(a, b, self.node.name, reason or f"{self.where()}: meets an index that cannot be removed")

    def pin(self, atoms: Tensor | dict | None, reason: str) -> None:
        if atoms is None:
            return
        if isinstance(atoms, dict):
            for v in atoms.values():
                self.pin(v, reason)
            return
        if isinstance(atoms, ParamRef):
            return  # a parameter not yet used as channels has no atoms to pin
        self.graph._atoms.pin(atoms, self.node.name, f"{self.where()}: {reason}")

    def pin_all(self, reason: str) -> None:
        """Pin every label of every argument (a boundary)."""

        def walk(arg):
            if isinstance(arg, fx.Node):
                lab = self.graph._labels.get(arg)
                if isinstance(lab, ParamRef):
                    value = self.value(arg)
                    for d in range(getattr(value, "ndim", 0)):
                        if value.shape[d] > 1:
                            self.pin(self.param(lab.info, d, "through"), reason)
                else:
                    _walk_labels(lab, lambda t: self.pin(t, reason))
            elif isinstance(arg, (list, tuple)):
                for a in arg:
                    walk(a)
            elif isinstance(arg, dict):
                for a in arg.values():
                    walk(a)

        walk(self.node.args)
        walk(self.node.kwargs)

    # --- parameters -----------------------------------------------------------------------------
    def tensor(self, module: nn.Module, attr: str) -> TensorInfo | None:
        """The TensorInfo of ``module.attr`` (a parameter or buffer), or None when it is absent."""
        return self.graph._info_of(module, attr)

    def param(self, info: TensorInfo, dim: int, role: str) -> Tensor:
        """The labels of ``info``'s dimension ``dim``; fresh atoms the first time it is used."""
        if dim not in info.dims:
            info.dims[dim] = self.new(info.tensor.shape[dim])
        info.roles.setdefault(dim, set()).add(role)
        return info.dims[dim]

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
        self.graph._taps.append(_Tap(self.node, self.module_name, dim, labels, _amax_except(value, dim)))


def _amax_except(value: Tensor, dim: int) -> Tensor:
    moved = value.detach().movedim(dim, -1).reshape(-1, value.shape[dim])
    return moved.abs().amax(0).float().cpu() if moved.shape[0] else torch.zeros(value.shape[dim])


def _walk_labels(labels: Any, fn) -> None:
    if isinstance(labels, dict):
        for v in labels.values():
            fn(v)
    elif isinstance(labels, (list, tuple)):
        for v in labels:
            _walk_labels(v, fn)


@dataclass(eq=False)
class _Tap:
    node: fx.Node
    module_name: str | None  # the layer reading the channels, when it is a module call
    dim: int
    labels: Tensor
    amax: Tensor  # max |input| per index on the example inputs


class DependencyGraph:
    """Coupled channel groups of ``model``, found by tracing it on ``example_inputs``.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (layers with parameters are kept whole).
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments; a
            small batch is enough (its shapes are used, its values only for dead-channel checks).
        exclude: module names or glob patterns whose parameters must keep their shape.
        unknown: what an operation without a rule does to labelled inputs: ``"error"`` (default)
            raises :class:`UnsupportedOperationError` naming the op and the node; ``"boundary"`` pins
            the channels of its inputs (they are then never removed).
        leaf_modules: extra module types to keep whole (each needs a rule, see ``register_rule``).

    ``groups()`` lists the prunable groups; ``boundaries()`` says which channels are pinned and why.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        exclude: Iterable[str] | str = (),
        unknown: str = "error",
        leaf_modules: Iterable[type[nn.Module]] = (),
    ) -> None:
        if unknown not in ("error", "boundary"):
            raise ValueError(f"unknown must be 'error' or 'boundary', got {unknown!r}")
        self.model = model
        self.unknown = unknown
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self._atoms = _Atoms()
        self._labels: dict[fx.Node, Any] = {}
        self._values: dict[fx.Node, Any] = {}
        self._taint: dict[fx.Node, frozenset] = {}
        self._taps: list[_Tap] = []
        self._infos: dict[int, TensorInfo] = {}
        self._calls: list[tuple[str, nn.Module, Any, Any]] = []  # (module name, module, input labels, output labels)
        self._groups: list[Group] | None = None
        self.stale = False
        self._index_tensors()
        self.fx_graph = self._trace(tuple(leaf_modules))
        self._check_exclude()
        self._run(example_inputs)
        self._pin_excluded()

    # --- building ---------------------------------------------------------------------------------
    def _index_tensors(self) -> None:
        owners = masking.parameter_owners(self.model)
        index = 0
        for owner_list in owners.values():
            first = owner_list[0]
            raw = masking.raw_parameter(first.module, first.param_name)
            mask = masking.get_mask(self.model, first.qualified_name, owner_list)
            info = TensorInfo(index, first.qualified_name, raw, "parameter",
                              [(o.module_name, o.module, o.param_name) for o in owner_list], mask)
            self._infos[id(raw)] = info
            index += 1
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            if isinstance(module, (parametrize.ParametrizationList, masking.PruningMask)):
                continue
            for bname, buf in module._buffers.items():
                if buf is None:
                    continue
                owner = (module_name, module, bname)
                if id(buf) in self._infos:
                    if all(o[1] is not module or o[2] != bname for o in self._infos[id(buf)].owners):
                        self._infos[id(buf)].owners.append(owner)
                    continue
                name = f"{module_name}.{bname}" if module_name else bname
                self._infos[id(buf)] = TensorInfo(index, name, buf, "buffer", [owner])
                index += 1

    def _info_of(self, module: nn.Module, attr: str) -> TensorInfo | None:
        if attr in module._buffers:
            buf = module._buffers[attr]
            return None if buf is None else self._infos.get(id(buf))
        try:
            raw = masking.raw_parameter(module, attr)
        except KeyError:
            return None
        return None if raw is None else self._infos.get(id(raw))

    def _trace(self, leaves: tuple[type, ...]) -> fx.Graph:
        tracer = _Tracer(leaves)
        try:
            return tracer.trace(self.model)
        except Exception as error:  # torch.fx raises many kinds (TraceError, TypeError, ...)
            raise UnsupportedOperationError(
                f"torch.fx cannot trace {type(self.model).__name__}: {error}. Structured pruning needs a "
                "traceable forward(); keep the untraceable submodule whole with leaf_modules=[its type] "
                "and register a rule for it (prunekit.structured.register_rule)"
            ) from error

    def _check_exclude(self) -> None:
        names = [n for n, _ in self.model.named_modules()]
        for pattern in self.exclude:
            if not any(_matches(n, pattern) for n in names):
                raise ValueError(f"exclude pattern {pattern!r} matches no module of the model")

    def _value(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: self._values[n])

    def _run(self, example_inputs: Any) -> None:
        from .rules import run_rule

        args, kwargs = _call(self.model, example_inputs)
        args = list(args)
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                for node in self.fx_graph.nodes:
                    if node.op == "placeholder":
                        self._values[node] = self._placeholder(node, args, kwargs)
                        self._labels[node] = _map_structure(self._values[node], lambda t: {})
                    elif node.op == "get_attr":
                        value = _fetch(self.model, node.target)
                        self._values[node] = value
                        info = self._infos.get(id(value)) if isinstance(value, Tensor) else None
                        self._labels[node] = ParamRef(info) if info is not None else _map_structure(value, lambda t: {})
                    elif node.op == "output":
                        self._pin_outputs(node)
                    else:
                        self._execute(node, run_rule)
        finally:
            for module, mode in modes:
                module.training = mode

    def _placeholder(self, node: fx.Node, args: list, kwargs: dict) -> Any:
        name = node.target.lstrip("*")
        if node.target.startswith("*"):
            rest, args[:] = tuple(args), []
            return rest
        if args:
            return args.pop(0)
        if name in kwargs:
            return kwargs[name]
        if node.args:
            return node.args[0]
        raise ValueError(f"example_inputs give no value for the model's argument {name!r}")

    def _execute(self, node: fx.Node, run_rule) -> None:
        args = self._value(node.args)
        kwargs = self._value(node.kwargs)
        module = None
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            out = module(*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
        self._values[node] = out
        ctx = RuleContext(self, node, module, out)
        if not isinstance(out, Tensor) and not (isinstance(out, (tuple, list)) and any(isinstance(o, Tensor) for o in out)):
            self._taint[node] = _taint_of(self, node, out)
        labels = run_rule(ctx)
        self._labels[node] = labels
        if module is not None:
            self._calls.append((node.target, module, ctx.labels(node.args[0]) if node.args else {}, labels))

    def _unknown(self, ctx: RuleContext) -> Any:
        """No rule: fine on unlabelled inputs; otherwise an error or a boundary."""
        if not _has_labels(ctx.labels(list(ctx.node.args) + list(ctx.node.kwargs.values()))):
            return _map_structure(ctx.output, lambda t: {})
        if self.unknown == "error":
            kind = type(ctx.module).__name__ if ctx.module is not None else None
            hint = (
                f"register a rule for {kind} with prunekit.structured.register_rule({kind}, rule)"
                if kind else "write the model with supported operations"
            )
            raise UnsupportedOperationError(
                f"structured pruning has no rule for {ctx.where()}, which receives channels of prunable "
                f"layers; {hint}, or pass unknown='boundary' to keep the channels it touches"
            )
        ctx.pin_all("no rule for this operation (boundary)")
        return _map_structure(ctx.output, lambda t: {})

    def _pin_outputs(self, node: fx.Node) -> None:
        def walk(arg):
            if isinstance(arg, fx.Node):
                lab = self._labels.get(arg)
                if isinstance(lab, ParamRef):
                    value = self._values[arg]
                    for d in range(value.ndim):
                        if value.shape[d] > 1:
                            if d not in lab.info.dims:
                                lab.info.dims[d] = self._atoms.new(value.shape[d])
                            self._atoms.pin(lab.info.dims[d], node.name, "reaches the model's output")
                else:
                    _walk_labels(lab, lambda t: self._atoms.pin(t, arg.name, "reaches the model's output"))
            elif isinstance(arg, (list, tuple)):
                for a in arg:
                    walk(a)
            elif isinstance(arg, dict):
                for a in arg.values():
                    walk(a)

        walk(node.args)

    def _pin_excluded(self) -> None:
        for info in self._infos.values():
            for pattern in self.exclude:
                if any(_matches(o[0], pattern) for o in info.owners):
                    for atoms in info.dims.values():
                        self._atoms.pin(atoms, info.name, f"excluded by {pattern!r}")

    # --- queries --------------------------------------------------------------------------------
    def _check_fresh(self) -> None:
        if self.stale:
            raise RuntimeError("this DependencyGraph describes the model before surgery; build a new one")

    def groups(self) -> list[Group]:
        """The prunable groups, in model order (by the first parameter they touch)."""
        self._check_fresh()
        if self._groups is None:
            self._groups = self._build_groups()
        return self._groups

    def boundaries(self) -> list[Boundary]:
        """Where channels were pinned (never removed), and why; one entry per node and reason."""
        merged: dict[tuple[str, str], int] = {}
        for atoms, node, reason in self._atoms.pins:
            merged[(node, reason)] = merged.get((node, reason), 0) + atoms.numel()
        return [Boundary(n, r, c) for (n, r), c in merged.items()]

    def pinned(self) -> Tensor:
        """Component ids that are pinned."""
        roots = self._atoms.roots()
        if not self._atoms.pins:
            return torch.empty(0, dtype=torch.long)
        return roots[torch.cat([a for a, _, _ in self._atoms.pins])].unique()

    def _build_groups(self) -> list[Group]:
        roots = self._atoms.roots()
        pinned = self.pinned()
        infos = sorted(self._infos.values(), key=lambda i: i.index)
        # (component, member key) pairs, vectorised per tensor dimension
        keys: list[tuple[TensorInfo, int]] = []
        comp_parts, key_parts = [], []
        for info in infos:
            for dim in sorted(info.dims):
                labels = info.dims[dim]
                valid = labels >= 0
                comps = roots[labels[valid]]
                keep = ~torch.isin(comps, pinned)
                comps = comps[keep].unique()
                if comps.numel():
                    comp_parts.append(comps)
                    key_parts.append(torch.full_like(comps, len(keys)))
                keys.append((info, dim))
        if not comp_parts:
            return []
        comp_all, key_all = torch.cat(comp_parts), torch.cat(key_parts)
        order = torch.argsort(comp_all * len(keys) + key_all)
        comp_all, key_all = comp_all[order], key_all[order]
        uniq, counts = torch.unique_consecutive(comp_all, return_counts=True)
        signatures: dict[tuple[int, ...], list[int]] = {}
        for comp, sig in zip(uniq.tolist(), torch.split(key_all, counts.tolist())):
            signatures.setdefault(tuple(sig.tolist()), []).append(comp)
        groups = []
        for sig, comps in sorted(signatures.items(), key=lambda item: (item[0][0], item[1][0])):
            comp_tensor = torch.tensor(comps, dtype=torch.long)
            lookup = torch.full((self._atoms.count,), -1, dtype=torch.long)
            lookup[comp_tensor] = torch.arange(len(comps))
            members = []
            for k in sig:
                info, dim = keys[k]
                labels = info.dims[dim]
                channel = torch.full_like(labels, -1)
                valid = labels >= 0
                channel[valid] = lookup[roots[labels[valid]]]
                idx = (channel >= 0).nonzero().flatten()
                members.append(Member(info.name, info.module_name, info.attr, info.kind, dim,
                                      frozenset(info.roles.get(dim, ())), idx, channel[idx], info))
            producers = [m.module_name or m.name for m in members if "out" in m.roles]
            producers = producers or [members[0].module_name or members[0].name]
            layers = tuple(dict.fromkeys(m.module_name or m.name for m in members))
            groups.append(Group(len(groups), producers[0], len(comps), members, comp_tensor, layers))
        return groups

    def group_of(self, layer: str, dim: str = "out") -> Group:
        """The group holding ``layer``'s output channels (``dim="out"``) or input channels (``"in"``)."""
        role = {"out": "out", "in": "in"}.get(dim)
        if role is None:
            raise ValueError(f"dim must be 'out' or 'in', got {dim!r}")
        found = [g for g in self.groups() if any(m.module_name == layer and role in m.roles for m in g.members)]
        if not found:
            known = sorted({m.module_name for g in self.groups() for m in g.members})
            if layer not in dict(self.model.named_modules()):
                from ..registry import unknown_name_message

                raise ValueError(unknown_name_message("layer", layer, known))
            raise ValueError(
                f"{layer}'s {dim}put channels are not prunable (pinned: see DependencyGraph.boundaries())"
            )
        return found[0]

    def channels_of(self, layer: str, indices: Sequence[int], dim: str = "out") -> dict[int, Tensor]:
        """Map indices along ``layer``'s output (or input) dimension to ``{group index: channels}``.

        Raises when an index is pinned (it would change the model's outputs or an unfollowable op)."""
        module = dict(self.model.named_modules()).get(layer)
        if module is None:
            from ..registry import unknown_name_message

            raise ValueError(unknown_name_message("layer", layer, [n for n, _ in self.model.named_modules() if n]))
        role = "out" if dim == "out" else "in"
        infos = [i for i in self._infos.values() if any(o[1] is module for o in i.owners)]
        target = None
        for info in infos:
            for d, roles in info.roles.items():
                if role in roles and (target is None or info.attr == "weight"):
                    target = (info, d)
        if target is None:
            raise ValueError(f"{layer} has no {dim}put channel dimension in the traced graph")
        info, d = target
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        size = info.tensor.shape[d]
        if idx.numel() and (idx.min() < -size or idx.max() >= size):
            raise ValueError(f"{layer}: channel indices must be in [0, {size}), got {idx.tolist()}")
        idx = idx % size
        roots = self._atoms.roots()
        labels = info.dims[d][idx]
        if (labels < 0).any():
            raise ValueError(f"{layer}: {dim}put channels {idx[labels < 0].tolist()} cannot be removed (fixed)")
        comps = roots[labels]
        pinned = torch.isin(comps, self.pinned())
        if pinned.any():
            raise ValueError(
                f"{layer}: {dim}put channels {idx[pinned].tolist()} cannot be removed: "
                + self._pin_reason(comps[pinned][0])
            )
        out: dict[int, list[Tensor]] = {}
        for group in self.groups():
            hit = torch.isin(group.roots, comps)
            if hit.any():
                out[group.index] = hit.nonzero().flatten()
        return out

    def channel_lookup(self, group: Group, labels: Tensor) -> Tensor:
        """The channel of ``group`` each label belongs to (-1 for none), vectorised."""
        roots = self._atoms.roots()
        lookup = torch.full((self._atoms.count,), -1, dtype=torch.long)
        lookup[group.roots] = torch.arange(group.size)
        channel = torch.full_like(labels, -1)
        valid = labels >= 0
        channel[valid] = lookup[roots[labels[valid]]]
        return channel

    def _pin_reason(self, comp: Tensor) -> str:
        roots = self._atoms.roots()
        for atoms, node, reason in self._atoms.pins:
            if (roots[atoms] == comp).any():
                return reason
        return "pinned"

    def summary(self) -> str:
        """One line per group: name, channels, members."""
        lines = []
        for g in self.groups():
            members = ", ".join(f"{m.name}[{m.dim}]" for m in g.members)
            lines.append(f"{g.index:3d} {g.name:<24} {g.size:5d} channels: {members}")
        return "\n".join(lines)


def _taint_of(graph: DependencyGraph, node: fx.Node, value: Any) -> frozenset:
    """Which (tensor node, dim) sizes an int/Size value depends on, when those dims carry channels."""
    if node.op == "call_method" and node.target == "size" or (
        node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] == "shape"
    ):
        source = node.args[0]
        lab = graph._labels.get(source, {}) if isinstance(source, fx.Node) else {}
        if not isinstance(lab, dict):
            return frozenset()
        dim = node.args[1] if node.op == "call_method" and len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dim, int):
            ndim = graph._values[source].ndim
            return frozenset({(source, dim % ndim)}) if dim % ndim in lab else frozenset()
        return frozenset((source, d) for d in lab)
    if node.op == "call_method" and node.target == "numel":
        source = node.args[0]
        lab = graph._labels.get(source, {})
        return frozenset((source, d) for d in lab) if isinstance(lab, dict) else frozenset()
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        base = graph._taint.get(node.args[0], frozenset())
        index = node.args[1]
        source_value = graph._values[node.args[0]]
        if isinstance(source_value, torch.Size) and isinstance(index, int):
            d = index % len(source_value)
            return frozenset(t for t in base if t[1] == d)
        return base
    taint: set = set()
    for arg in list(node.args) + list(node.kwargs.values()):
        fx.node.map_arg(arg, lambda n: taint.update(graph._taint.get(n, ())))
    return frozenset(taint)


def _fetch(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")
