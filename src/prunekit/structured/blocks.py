"""Whole residual blocks: find them, score them, replace the least important by an identity.

A *residual block* is a submodule (not a single layer) whose output has its input's shape and whose
traced graph adds its input back (``out = f(x) + x``, an identity shortcut). Removing it replaces it by
:class:`RemovedBlock` (an ``nn.Identity``), which is what the block computes when ``f`` contributes
nothing: the approximation the block scores measure.

Block scores (higher = more important, kept):

* ``"residual"`` (data-free with the example inputs, or over ``data``): the relative change the block
  makes, ``||block(x) - x|| / ||x||``, averaged over batches (Veit et al. 2016: blocks that change
  little can be dropped);
* ``"loss"`` (labelled ``data``): the increase of the loss when the block alone is replaced by an
  identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..modules import call_model, eval_mode, replace_module, split_inputs
from ..registry import unknown_name_message
from ..statistics import LossFn, batch_loss, move_to, split_batch
from .graph import FxTracer
from .undo import all_or_nothing

__all__ = ["RemovedBlock", "residual_blocks", "block_scores", "remove_blocks", "BLOCK_METHODS"]

BLOCK_METHODS = ("residual", "loss")


class RemovedBlock(nn.Identity):
    """Stands where a residual block was removed (``pk.save`` records it; ``pk.load`` puts it back)."""


def residual_blocks(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the submodules that are residual blocks with an identity shortcut, in model order."""
    graph = FxTracer().trace(model)
    modules = dict(model.named_modules())
    inside: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for qualname in stack:
            inside.setdefault(qualname, []).append(node)
    shapes = _io_shapes(model, example_inputs, [n for n in inside if n in modules])
    found = []
    for name, nodes in inside.items():
        module = modules.get(name)
        if module is None or not name or not list(module.children()) or isinstance(module, RemovedBlock):
            continue
        members = set(nodes)
        entries = {a for n in nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
        if len(entries) != 1:
            continue
        (entry,) = entries
        adds = [n for n in nodes if n.op in ("call_function", "call_method")
                and getattr(n.target, "__name__", n.target) in ("add", "iadd", "add_") and entry in n.args
                and list(n.meta.get("nn_module_stack") or {})[-1:] == [name]]  # the block's own add
        io = shapes.get(name)
        if adds and io is not None and io[0] == io[1]:
            found.append(name)
    return found


def _io_shapes(model: nn.Module, example_inputs: Any, names: Sequence[str]) -> dict[str, tuple]:
    modules = dict(model.named_modules())
    shapes: dict[str, tuple] = {}
    handles = []
    for name in names:
        def hook(module, args, output, name=name):
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def block_scores(
    model: nn.Module,
    blocks: Sequence[str],
    data: Iterable,
    method: str = "residual",
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Importance of each block (higher = kept longer)."""
    if method not in BLOCK_METHODS:
        raise ValueError(unknown_name_message("block method", method, BLOCK_METHODS))
    modules = dict(model.named_modules())
    device = next(iter(model.parameters()), torch.empty(0)).device
    with eval_mode(model), torch.no_grad():
        if method == "residual":
            sums = {b: 0.0 for b in blocks}
            counts = {b: 0 for b in blocks}
            handles = []
            for b in blocks:
                def hook(module, args, output, b=b):
                    x = args[0]
                    sums[b] += float((output - x).norm() / x.norm().clamp_min(1e-12))
                    counts[b] += 1
                handles.append(modules[b].register_forward_hook(hook))
            try:
                for batch in islice(data, max_batches):
                    args, kwargs, _ = split_batch(batch)
                    model(*move_to(args, device), **move_to(kwargs, device))
            finally:
                for h in handles:
                    h.remove()
            if not any(counts.values()):
                raise ValueError("the data yielded no batch")
            return {b: sums[b] / max(counts[b], 1) for b in blocks}
        batches = list(islice(data, max_batches))
        if not batches:
            raise ValueError("the data yielded no batch")

        def mean_loss() -> float:
            return sum(float(batch_loss(model, b, loss_fn)) for b in batches) / len(batches)

        base = mean_loss()
        scores = {}
        for b in blocks:
            old = replace_module(model, b, RemovedBlock())
            try:
                scores[b] = mean_loss() - base
            finally:
                replace_module(model, b, old)
        return scores


def remove_blocks(
    model: nn.Module,
    example_inputs: Any,
    count: int = 1,
    *,
    method: str = "residual",
    blocks: Sequence[str] | None = None,
    data: Iterable | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Replace the ``count`` least important residual blocks by identities, in place.

    ``blocks`` restricts the candidates (default: every residual block, see :func:`residual_blocks`);
    ``data`` defaults to the example inputs for ``"residual"`` and is required (with labels) for
    ``"loss"``. Returns the scores of the blocks removed.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    candidates = residual_blocks(model, example_inputs)
    if blocks is not None:
        unknown = [b for b in blocks if b not in candidates]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a residual block with an identity shortcut "
                             f"(candidates: {', '.join(candidates) or 'none'})")
        candidates = list(blocks)
    if count > len(candidates):
        raise ValueError(f"cannot remove {count} blocks: the model has {len(candidates)} removable residual blocks")
    if method == "loss" and data is None:
        raise ValueError("block method 'loss' needs labelled data= batches")
    if data is None:
        args, kwargs = split_inputs(example_inputs)
        data = [kwargs] if kwargs else [args[0] if len(args) == 1 else (args, None)]
    scores = block_scores(model, candidates, data, method, loss_fn, max_batches)
    chosen = sorted(candidates, key=lambda b: (scores[b], candidates.index(b)))[:count]
    with all_or_nothing(model):
        for b in chosen:
            replace_module(model, b, RemovedBlock())
    return {b: scores[b] for b in chosen}
