"""Retraining helpers from Han et al. 2015: dropout rescaled to the pruned capacity, and frozen layers."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .. import masking
from ..distributed import unwrap
from ..modules import matches

__all__ = ["rescale_dropout", "freeze", "unfreeze"]

_WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ORIGINAL_P = "_prunekit_original_p"


def _connections(model: nn.Module, layer_name: str) -> tuple[int, int]:
    """(C_o, C_r): the layer's weight count and how many of them remain (unmasked and non-zero)."""
    layer = model.get_submodule(layer_name)
    mask = masking.get_mask(model, f"{layer_name}.weight" if layer_name else "weight")
    weight = layer.weight
    remaining = int(mask.count_nonzero()) if mask is not None else int(torch.count_nonzero(weight.detach()))
    return weight.numel(), remaining


def _default_pairs(model: nn.Module) -> dict[str, str]:
    """Each dropout with the weight layer registered just before it (the layer whose outputs it drops);
    a dropout before any weight layer goes with the first one after it."""
    pairs, pending, last = {}, [], None
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHT_LAYERS):
            last = name
            for dropout in pending:
                pairs[dropout] = name
            pending = []
        elif isinstance(module, _DROPOUTS):
            if last is None:
                pending.append(name)
            else:
                pairs[name] = last
    return pairs


def rescale_dropout(model: nn.Module, pairs: Mapping[str, str] | None = None) -> dict[str, float]:
    """Lower dropout after pruning, as Han et al. 2015: D_r = D_o * sqrt(C_r / C_o).

    ``C_o`` is the number of weights of the layer a dropout belongs to and ``C_r`` how many remain;
    ``D_o`` is the dropout's rate before the first call (remembered on the module, so calling again after
    more pruning starts from the original rate, not compounding). ``pairs`` maps dropout module names to
    layer names; by default each dropout belongs to the weight layer registered just before it (pass
    ``pairs`` when registration order is not the order of the forward pass). Returns the new rates.
    """
    model = unwrap(model)
    modules = dict(model.named_modules())
    chosen = dict(pairs) if pairs is not None else _default_pairs(model)
    for dropout, layer in chosen.items():
        if not isinstance(modules.get(dropout), _DROPOUTS):
            raise ValueError(f"{dropout!r} is not a dropout module of the model")
        if not isinstance(modules.get(layer), _WEIGHT_LAYERS):
            raise ValueError(f"{layer!r} (paired with {dropout!r}) is not a Linear or convolution of the model")
    rates = {}
    for dropout, layer in chosen.items():
        module = modules[dropout]
        original = getattr(module, _ORIGINAL_P, module.p)
        setattr(module, _ORIGINAL_P, original)
        total, remaining = _connections(model, layer)
        module.p = original * math.sqrt(remaining / total)
        rates[dropout] = module.p
    return rates


def _select(model: nn.Module, selectors) -> list[tuple[str, nn.Module]]:
    if not selectors:
        selectors = (nn.modules.conv._ConvNd,)
    chosen: dict[str, nn.Module] = {}
    for selector in selectors:
        hit = [
            (n, m) for n, m in model.named_modules()
            if (isinstance(selector, type) and isinstance(m, selector))
            or (isinstance(selector, str) and matches(n, selector))
        ]
        if not hit:
            label = selector.__name__ if isinstance(selector, type) else repr(selector)
            raise ValueError(f"{label} matches no module of the model")
        chosen.update(hit)
    return list(chosen.items())


def _set_trainable(model: nn.Module, selectors, flag: bool) -> list[str]:
    model = unwrap(model)
    names = []
    for module_name, module in _select(model, selectors):
        for pname, param in module.named_parameters():
            param.requires_grad_(flag)
            names.append(masking.clean_name(f"{module_name}.{pname}" if module_name else pname))
    return list(dict.fromkeys(names))


def freeze(model: nn.Module, *selectors: str | type[nn.Module]) -> list[str]:
    """Stop training the parameters of the selected modules (``requires_grad=False``), masks included.

    Selectors are module types or module names/globs; by default every convolution, so that the fully
    connected layers retrain while the convolutions stay fixed (Han et al. 2015). Build the optimizer
    after freezing (or it keeps stepping weight decay on them). Returns the parameter names frozen.
    """
    return _set_trainable(model, selectors, False)


def unfreeze(model: nn.Module, *selectors: str | type[nn.Module]) -> list[str]:
    """Undo ``freeze`` for the selected modules (by default every convolution)."""
    return _set_trainable(model, selectors, True)
