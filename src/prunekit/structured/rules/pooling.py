"""Rules of pooling, padding and resampling: the spatial dimensions change size, channels pass."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import first_input, rule_for_functions, rule_for_modules
from .elementwise import keep_dims

__all__ = ["spatial"]


def spatial(ctx, x_arg, n_spatial: int) -> Any:
    """Pooling and resampling: the last ``n_spatial`` dims change size (pinned if labelled)."""
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    first = value.ndim - n_spatial
    out = {}
    for d, l in x.items():
        if d >= first:
            ctx.pin(l, f"pools or resamples dimension {d}, which carries channels")
        else:
            out[d] = l
    if isinstance(ctx.output, (tuple, list)):
        return [dict(out) if isinstance(o, Tensor) else None for o in ctx.output]
    return out


# --------------------------------------------------------------------------------------------------
# Pooling and resampling (functional)
# --------------------------------------------------------------------------------------------------

def _pooling(n_spatial: int):
    def rule(ctx):
        return spatial(ctx, ctx.raw(0, "input"), n_spatial)

    return rule


for _name, _n in [("max_pool1d", 1), ("max_pool2d", 2), ("max_pool3d", 3), ("avg_pool1d", 1), ("avg_pool2d", 2),
                  ("avg_pool3d", 3), ("adaptive_avg_pool1d", 1), ("adaptive_avg_pool2d", 2),
                  ("adaptive_avg_pool3d", 3), ("adaptive_max_pool1d", 1), ("adaptive_max_pool2d", 2),
                  ("adaptive_max_pool3d", 3), ("lp_pool1d", 1), ("lp_pool2d", 2), ("lp_pool3d", 3),
                  ("max_pool1d_with_indices", 1), ("max_pool2d_with_indices", 2), ("max_pool3d_with_indices", 3),
                  ("adaptive_max_pool2d_with_indices", 2), ("fractional_max_pool2d", 2)]:
    rule_for_functions(*(getattr(owner, _name) for owner in (F, torch) if hasattr(owner, _name)))(_pooling(_n))


@rule_for_functions(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
def _interpolate(ctx):
    x_arg = ctx.raw(0, "input")
    return spatial(ctx, x_arg, ctx.value(x_arg).ndim - 2)


@rule_for_functions(F.pad)
def _pad(ctx):
    x_arg = ctx.raw(0, "input")
    value = ctx.value(x_arg)
    pad = ctx.arg(1, "pad")
    padded = [value.ndim - 1 - i // 2 for i, p in enumerate(pad) if p]
    x = ctx.dims(x_arg)
    return keep_dims(ctx, x, sorted(set(padded)), "pads a channel dimension") | {}


@rule_for_modules(nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d)
def _pool1d(ctx):
    return spatial(ctx, first_input(ctx), 1)


@rule_for_modules(nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
         nn.FractionalMaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
def _pool2d(ctx):
    return spatial(ctx, first_input(ctx), 2)


@rule_for_modules(nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.ConstantPad3d,
         nn.ReplicationPad3d, nn.ZeroPad3d if hasattr(nn, "ZeroPad3d") else nn.ConstantPad3d)
def _pool3d(ctx):
    return spatial(ctx, first_input(ctx), 3)


@rule_for_modules(nn.ConstantPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d)
def _pad1d(ctx):
    return spatial(ctx, first_input(ctx), 1)


@rule_for_modules(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def _upsample(ctx):
    x_arg = first_input(ctx)
    return spatial(ctx, x_arg, ctx.value(x_arg).ndim - 2)
