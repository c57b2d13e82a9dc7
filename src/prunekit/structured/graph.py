"""The dependency graph: which parameter slices must shrink together when one channel goes.

The model is traced with ``torch.fx`` (layers with parameters stay whole, as ``call_module`` nodes) and
then run once on the example inputs by a small interpreter that carries, beside every tensor, a
*label* for each index of each channel-carrying dimension. Labels are *atoms*: a layer's output
channels (a Linear's or a convolution's filters, an Embedding's features, the heads of a
MultiheadAttention) get fresh atoms; every operation then says, through its rule in ``rules/``, how
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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..modules import eval_mode, matches, split_inputs
from ..registry import unknown_name_message
from ._types import TensorInfo, UnsupportedOperationError
from .context import Op
from .trace_state import TraceState
from .hf import is_transformers_model
from .hf import prepare as prepare_transformers
from .rules import module_rule
from .tracing import eager_trace

__all__ = ["DependencyGraph", "Group", "Member", "UnsupportedOperationError", "Boundary", "FxTracer"]

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


class FxTracer(fx.Tracer):
    """Keeps layers with a rule (and torch.nn's own modules) whole; traces through everything else."""

    def __init__(self, extra_leaves: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.extra_leaves = extra_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.extra_leaves) or module_rule(m) is not None:
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return super().is_leaf_module(m, module_qualified_name)


_KINDS = {"call_module": "module", "call_function": "function", "call_method": "method"}


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
        tracer: ``"fx"`` (torch.fx symbolic tracing), ``"eager"`` (one recorded forward pass, see
            ``tracing.py``: Hugging Face models, data-dependent control flow) or ``"auto"`` (fx, and the
            eager trace where fx fails).
        hidden: let LayerNorm/RMSNorm over a channel dimension follow a removal instead of pinning it,
            so a transformer's hidden (embedding) width becomes prunable; the norms' statistics then
            change, so the pruned model is not output-equivalent to its masked version.

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
        tracer: str = "auto",
        hidden: bool = False,
    ) -> None:
        if unknown not in ("error", "boundary"):
            raise ValueError(f"unknown must be 'error' or 'boundary', got {unknown!r}")
        if tracer not in ("auto", "fx", "eager"):
            raise ValueError(f"tracer must be 'auto', 'fx' or 'eager', got {tracer!r}")
        if is_transformers_model(model):
            prepare_transformers(model)
        self.model = model
        self.unknown = unknown
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self._groups: list[Group] | None = None
        self.stale = False
        self.fx_graph = self._trace(tuple(leaf_modules), example_inputs, tracer)
        self._check_exclude()
        self._ops = {node: Op(_KINDS[node.op], node.target, node.args, node.kwargs, node.name,
                              model.get_submodule(node.target) if node.op == "call_module" else None)
                     for node in self.fx_graph.nodes if node.op in _KINDS}
        self._state = TraceState(model, lambda arg: isinstance(arg, fx.Node), unknown,
                                 users_of=lambda node: [(self._ops.get(u), u) for u in node.users]
                                 if isinstance(node, fx.Node) else None)
        self._state.options["hidden"] = bool(hidden)
        self._atoms = self._state.atoms
        self._run(example_inputs)
        self._pin_excluded()

    # --- what the trace found (read by surgery, criteria and reports) ------------------------------
    @property
    def tensors(self) -> list[TensorInfo]:
        """Every parameter and buffer of the model, with the channel labels of its dimensions."""
        return list(self._state.infos.values())

    @property
    def calls(self) -> list:
        """Every module call of the trace (:class:`~prunekit.structured.trace_state.Call`), in order."""
        return self._state.calls

    @property
    def taps(self) -> list:
        """Where layers read channels (:class:`~prunekit.structured.context.Tap`), in order."""
        return self._state.taps

    def labels(self, node: fx.Node) -> Any:
        """The channel labels of ``node``'s output in the trace: ``{dim: atom ids}`` for a tensor."""
        return self._state.labels(node)

    def roots(self) -> Tensor:
        """The component (removable channel) of every atom."""
        return self._atoms.roots()

    # --- building ---------------------------------------------------------------------------------
    def _trace(self, leaves: tuple[type, ...], example_inputs: Any, how: str) -> fx.Graph:
        if how == "eager":
            args, kwargs = split_inputs(example_inputs)
            return eager_trace(self.model, args, kwargs, lambda m: isinstance(m, leaves) or module_rule(m) is not None)
        tracer = FxTracer(leaves)
        try:
            return tracer.trace(self.model)
        except Exception as error:  # torch.fx raises many kinds (TraceError, TypeError, ...)
            if how == "auto":
                return self._trace(leaves, example_inputs, "eager")
            raise UnsupportedOperationError(
                f"torch.fx cannot trace {type(self.model).__name__}: {error}. Structured pruning needs a "
                "traceable forward(); keep the untraceable submodule whole with leaf_modules=[its type] "
                "and register a rule for it (prunekit.structured.register_rule)"
            ) from error

    def _check_exclude(self) -> None:
        names = [n for n, _ in self.model.named_modules()]
        for pattern in self.exclude:
            if not any(matches(n, pattern) for n in names):
                raise ValueError(f"exclude pattern {pattern!r} matches no module of the model")

    def _pin_excluded(self) -> None:
        for info in self._state.infos.values():
            for pattern in self.exclude:
                if any(matches(o[0], pattern) for o in info.owners):
                    for atoms in info.dims.values():
                        self._atoms.pin(atoms, info.name, f"excluded by {pattern!r}")

    def _run(self, example_inputs: Any) -> None:
        args, kwargs = split_inputs(example_inputs)
        args = list(args)
        state = self._state
        with eval_mode(self.model), torch.no_grad():
            for node in self.fx_graph.nodes:
                if node.op == "placeholder":
                    state.set_input(node, self._placeholder(node, args, kwargs))
                elif node.op == "get_attr":
                    state.set_attribute(node, _fetch(self.model, node.target))
                elif node.op == "output":
                    state.pin_outputs(node.args, node.name)
                else:
                    op = self._ops[node]
                    state.record(node, op, state.execute(op))

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

    # --- queries --------------------------------------------------------------------------------
    def check_fresh(self) -> None:
        """Raise ``RuntimeError`` when surgery has changed the model since this graph was built."""
        if self.stale:
            raise RuntimeError("this DependencyGraph describes the model before surgery; build a new one")

    def groups(self) -> list[Group]:
        """The prunable groups, in model order (by the first parameter they touch)."""
        self.check_fresh()
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
        infos = sorted(self._state.infos.values(), key=lambda i: i.index)
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
            if not any(keys[k][0].roles.get(keys[k][1], set()) & {"in", "out"} for k in sig):
                # no layer writes or reads these channels (parameters used directly, e.g. the parts of a
                # bias concatenated in forward()): removing them alone would break whatever uses them
                first = keys[sig[0]][0]
                self._atoms.pin(comp_tensor, first.name, "no layer writes or reads these channels "
                                                         "(parameters used directly); never pruned on their own")
                continue
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
            raise ValueError(unknown_name_message("layer", layer, [n for n, _ in self.model.named_modules() if n]))
        role = "out" if dim == "out" else "in"
        infos = [i for i in self._state.infos.values() if any(o[1] is module for o in i.owners)]
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


def _fetch(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
