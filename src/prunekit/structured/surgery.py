"""Physical removal: shrink every parameter and buffer of the removed channels, fix layer attributes.

Given a :class:`~prunekit.structured.graph.DependencyGraph` and the channels to remove (per group), every
tensor dimension that carries one of them is shrunk with ``index_select``, in place (``tensor.data`` is
replaced, so a parameter stays the same object: tied weights stay tied, and prunekit masks are sliced
along with their parameter). Then each layer whose tensors or input changed gets its attributes updated
by its rule's ``resize`` (``in_features``, ``out_channels``, ``groups``, ``num_features``, ``num_groups``,
``normalized_shape``, ``embedding_dim``, heads, ...). Everything is checked before anything changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .graph import DependencyGraph
from .rules import shape_rule
from .undo import all_or_nothing

__all__ = ["Sizes", "remove_channels", "channel_masks", "RESIZED_ATTR"]

#: attribute set on every layer that surgery resized (``pk.save`` records their shapes)
RESIZED_ATTR = "_prunekit_resized"


@dataclass(frozen=True)
class Sizes:
    """What a ``resize`` function may need beyond the layer's own tensors."""

    input_channels: int | None  # new size of the channel dimension of the layer's first input


def _removed_components(graph: DependencyGraph, removal: Mapping[int, Tensor]) -> Tensor:
    groups = graph.groups()
    parts = []
    for index, channels in removal.items():
        if not 0 <= index < len(groups):
            raise ValueError(f"no group {index} (the graph has {len(groups)})")
        group = groups[index]
        channels = torch.as_tensor(channels, dtype=torch.long).reshape(-1).unique()
        if channels.numel() and (channels.min() < 0 or channels.max() >= group.size):
            raise ValueError(f"group {group.name}: channels must be in [0, {group.size}), got {channels.tolist()}")
        if channels.numel() >= group.size:
            raise ValueError(f"group {group.name}: removing all {group.size} channels would leave the layer empty")
        parts.append(group.roots[channels])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _keep_indices(graph: DependencyGraph, removed: Tensor):
    """{TensorInfo: {dim: kept indices}} for every tensor dimension that loses something."""
    roots = graph.roots()
    plan = {}
    for info in graph.tensors:
        for dim, labels in info.dims.items():
            keep = labels < 0
            keep[~keep] = ~torch.isin(roots[labels[~keep]], removed)
            if bool(keep.all()):
                continue
            if not bool(keep.any()):
                raise ValueError(f"removing these channels would empty {info.name} along dimension {dim}")
            plan.setdefault(info, {})[dim] = keep.nonzero().flatten()
    return plan


def remove_channels(graph: DependencyGraph, removal: Mapping[int, Tensor]) -> list[str]:
    """Remove ``removal[group index]`` channels of each group from ``graph.model``, in place.

    Returns the names of the layers that changed. The graph is stale afterwards. The whole plan (which
    indices every tensor keeps, every layer's new input size) is computed and checked first; if a step of
    the change itself raises, the model is restored exactly (see undo.py) and the error propagates.
    """
    graph.check_fresh()
    removed = _removed_components(graph, removal)
    if removed.numel() == 0:
        return []
    plan = _keep_indices(graph, removed)
    roots = graph.roots()
    # new input channel counts of every called layer, before tensors change
    input_sizes: dict[int, int] = {}
    for call in graph.calls:
        lab = call.input_channels()
        if lab is not None:
            keep = lab < 0
            keep[~keep] = ~torch.isin(roots[lab[~keep]], removed)
            input_sizes[id(call.module)] = int(keep.sum())
    with all_or_nothing(graph.model):
        changed = _change(graph, plan, input_sizes)
    graph.stale = True
    return sorted({name for name, _ in changed.values()})


def _change(graph: DependencyGraph, plan: dict, input_sizes: dict[int, int]) -> dict[int, tuple[str, nn.Module]]:
    """Shrink the tensors as planned, then let every changed layer's rule resize its attributes."""
    changed: dict[int, tuple[str, nn.Module]] = {}
    with torch.no_grad():
        for info, dims in plan.items():
            new = info.tensor.data
            mask = info.mask
            for dim, keep in sorted(dims.items()):
                new = new.index_select(dim, keep.to(new.device))
                if mask is not None:
                    mask = mask.index_select(dim, keep.to(mask.device))
            info.tensor.data = new.contiguous()
            if isinstance(info.tensor, nn.Parameter):
                info.tensor.grad = None
            if info.mask is not None:
                info.mask.data = mask.contiguous()
            for name, module, _ in info.owners:
                changed[id(module)] = (name, module)
    for call in graph.calls:
        name, module = call.name, call.module
        rule = shape_rule(module)
        if id(module) in input_sizes and id(module) not in changed and rule is not None and rule.resize is not None:
            lab = call.input_channels()
            if lab is not None and input_sizes[id(module)] != lab.numel():
                changed[id(module)] = (name, module)
    for name, module in graph.model.named_modules():  # a layer whose sizes live in its children's tensors
        rule = shape_rule(module)
        if id(module) not in changed and rule is not None and rule.resize is not None and any(
                id(child) in changed for child in module.modules()):
            changed[id(module)] = (name, module)
    for name, module in changed.values():
        rule = shape_rule(module)
        if rule is not None and rule.resize is not None:
            rule.resize(module, Sizes(input_sizes.get(id(module))))
        setattr(module, RESIZED_ATTR, True)
    return changed


def channel_masks(graph: DependencyGraph, removal: Mapping[int, Tensor]) -> dict[str, Tensor]:
    """Keep-masks (``True`` = kept) for every parameter that the removal would shrink: the group's
    weights, biases and normalisation parameters alike, so the masked model computes what the
    physically pruned one computes. Buffers are not masked (a removed channel's normalisation output
    is zero through its zero weight and bias)."""
    removed = _removed_components(graph, removal)
    plan = _keep_indices(graph, removed) if removed.numel() else {}
    out = {}
    for info, dims in plan.items():
        if info.kind != "parameter" or not info.tensor.is_floating_point():
            continue
        keep = torch.ones(info.tensor.shape, dtype=torch.bool, device=info.tensor.device)
        for dim, idx in dims.items():
            drop = torch.ones(info.tensor.shape[dim], dtype=torch.bool)
            drop[idx] = False
            shape = [1] * info.tensor.ndim
            shape[dim] = -1
            keep &= ~drop.view(shape).to(keep.device)
        out[info.name] = keep
    return out
