"""Attach and detach one extra parametrization on a target (and on every module tied to it)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import distributed, masking
from ..targets import Target


def attach_parametrization(target: Target, parametrization: nn.Module) -> None:
    """Append ``parametrization`` to the target's parametrizations (after any pruning mask)."""
    for owner in target.owners:
        if not parametrize.is_parametrized(owner.module):
            masking.own_class(owner.module)
        with masking.keep_gradient_accumulator():  # DDP keeps averaging the parameter's gradients
            parametrize.register_parametrization(owner.module, owner.param_name, parametrization, unsafe=True)


def detach_parametrization(target: Target, parametrization: nn.Module) -> None:
    """Remove ``parametrization`` from the target, leaving the others (the stored values are unchanged)."""
    for owner in target.owners:
        if not parametrize.is_parametrized(owner.module, owner.param_name):
            continue
        plist = owner.module.parametrizations[owner.param_name]
        if len(plist) == 1 and plist[0] is parametrization:
            masking.own_class(owner.module)
            parametrize.remove_parametrizations(owner.module, owner.param_name, leave_parametrized=False)
            continue
        for i in reversed(range(len(plist))):
            if plist[i] is parametrization:
                del plist[i]
    if len(target.owners) > 1:  # removing parametrizations gives each owner its own Parameter: re-tie
        first = target.owners[0]
        if not parametrize.is_parametrized(first.module, first.param_name):
            shared = first.module._parameters[first.param_name]
            for owner in target.owners[1:]:
                if not parametrize.is_parametrized(owner.module, owner.param_name):
                    owner.module._parameters[owner.param_name] = shared


def attach_masks(model: nn.Module, masks: Mapping[str, Tensor], targets: list[Target] = ()) -> dict[str, Tensor]:
    """Attach (tighten) ``masks`` by parameter name; under DDP rank 0's masks are attached everywhere."""
    if distributed.is_distributed():
        masks = distributed.broadcast_masks(masks)
    owners = {t.name: t.owners for t in targets}
    return {name: masking.attach(model, name, m, owners=owners.get(name)) for name, m in masks.items()}


def replace_with_masks(
    model: nn.Module, targets: list[Target], parametrizations: Mapping[str, nn.Module], keep: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Take each target's extra parametrization off and attach the prunekit masks ``keep`` in its place
    (pruned weights then stay at zero). Returns the masks attached."""
    for target in targets:
        detach_parametrization(target, parametrizations[target.name])
    with torch.no_grad():
        return attach_masks(model, keep, targets)


def masks_sparsity(keep: Mapping[str, Tensor]) -> float:
    """Fraction of the entries that the keep-masks remove, all masks together."""
    return 1.0 - sum(int(k.sum()) for k in keep.values()) / sum(k.numel() for k in keep.values())


def check_supported(target: Target, kinds: tuple[type[nn.Module], ...], what: str) -> None:
    if not isinstance(target.module, kinds) or target.param_name != "weight":
        names = ", ".join(k.__name__ for k in kinds)
        raise ValueError(f"{what} handles the weights of {names} layers; {target.name} is not one")
