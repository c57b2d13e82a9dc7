"""Rules of element-wise ops, activations, reductions and normalisations over one dimension.

Also the building blocks other families use: :func:`broadcast` (operands combined with broadcasting),
:func:`passthrough` (same labels out as in), :func:`keep_dims` and :func:`reduce_dims`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._types import ParamRef
from .base import first_input, norm_dim, rule_for_functions, rule_for_methods, rule_for_modules

__all__ = ["broadcast", "passthrough", "keep_dims", "reduce_dims"]


# --------------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------------


def broadcast(ctx, operands: Sequence[Any], out_shape: Sequence[int], skip: Sequence[int] = ()) -> dict:
    """Element-wise combination with broadcasting: labels of the same output dimension are made equal;
    an unlabelled operand of full size there fixes it (its channels are pinned)."""
    out_ndim = len(out_shape)
    result: dict[int, Tensor] = {}
    items = []
    for arg in operands:
        value = ctx.value(arg)
        if isinstance(value, Tensor):
            items.append((value, ctx.labels(arg)))
    for od in range(out_ndim):
        if od in skip:
            continue
        labeled, params, fixed = [], [], False
        for value, lab in items:
            k = od - (out_ndim - value.ndim)
            if k < 0:
                continue
            if value.shape[k] == 1 and out_shape[od] != 1:
                continue
            if isinstance(lab, ParamRef):
                if value.shape[k] > 1:  # a size-1 dim of a parameter broadcasts: no channels there
                    params.append((lab.info, k))
                continue
            found = lab.get(k) if isinstance(lab, dict) else None
            if found is None:
                if value.shape[k] > 1:
                    fixed = True
                continue
            labeled.append(found)
        if fixed:
            for l in labeled:
                ctx.pin(l, f"combined with a tensor whose dimension {od} is not a channel dimension")
            continue
        if not labeled and not params:
            continue
        base = labeled[0] if labeled else ctx.param(params[0][0], params[0][1], "through")
        for l in labeled[1:]:
            ctx.union(base, l)
        for info, k in params:
            ctx.consume(info, k, base, "through")
        result[od] = base
    return result


def passthrough(ctx, arg_index: int = 0) -> Any:
    """The output has the labels of the input (element-wise unary ops, activations, dropout)."""
    x = ctx.dims(ctx.raw(arg_index, "input"))
    if isinstance(ctx.output, Tensor):
        if tuple(ctx.output.shape) != tuple(ctx.value(ctx.raw(arg_index, "input")).shape):
            return broadcast(ctx, [ctx.raw(arg_index, "input")], ctx.output.shape)
        return dict(x)
    return [dict(x) if isinstance(o, Tensor) else None for o in ctx.output]


def keep_dims(ctx, x: dict, pinned_dims: Sequence[int], reason: str) -> dict:
    """Same shape in and out; the listed dims are pinned when labelled."""
    for d in pinned_dims:
        if d in x:
            ctx.pin(x[d], reason)
    return dict(x)


def reduce_dims(ctx, x_arg, dims, keepdim: bool) -> dict:
    """A reduction: labelled reduced dims are pinned; the rest are renumbered."""
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    ndim = value.ndim
    if dims is None:
        dims = list(range(ndim))
    elif isinstance(dims, int):
        dims = [dims]
    dims = sorted({norm_dim(d, ndim) for d in dims})
    for d in dims:
        if d in x:
            ctx.pin(x[d], f"reduces over dimension {d}, which carries channels")
    out = {}
    for d, l in x.items():
        if d in dims:
            continue
        out[d if keepdim else d - sum(1 for r in dims if r < d)] = l
    return out


# --------------------------------------------------------------------------------------------------
# Non-tensor helpers: sizes, attributes
# --------------------------------------------------------------------------------------------------


@rule_for_methods("size", "dim", "numel", "nelement", "ndimension", "element_size", "get_device", "is_contiguous",
         "is_floating_point", "data_ptr", "stride", "storage_offset", "item", "tolist")
def _meta(ctx):
    return None


@rule_for_functions(getattr)
def _getattr(ctx):
    name = ctx.raw(1)
    if name in ("T", "mT"):
        x = ctx.dims(ctx.raw(0))
        nd = ctx.value(ctx.raw(0)).ndim
        if nd < 2:
            return dict(x)
        a, b = nd - 2, nd - 1
        return {({a: b, b: a}.get(d, d)): l for d, l in x.items()}
    if name in ("data",):
        return dict(ctx.dims(ctx.raw(0)))
    if isinstance(ctx.output, Tensor):
        return ctx.unknown()
    return None


_INT_OPS = [operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
            operator.neg, operator.pow, int, float, math.ceil, math.floor, math.sqrt, operator.eq,
            operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.not_, operator.and_,
            operator.or_]


# --------------------------------------------------------------------------------------------------
# Element-wise
# --------------------------------------------------------------------------------------------------

_UNARY_FUNCTIONS = [
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.mish, F.softplus, F.selu, F.celu, F.logsigmoid, F.softsign, F.tanhshrink,
    F.hardshrink, F.softshrink, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.neg,
    torch.sqrt, torch.rsqrt, torch.square, torch.sin, torch.cos, torch.erf, torch.sign, torch.reciprocal,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.nn.functional.sigmoid, torch.nn.functional.tanh, torch.clone, torch.detach, operator.neg,
    operator.pos, abs, torch.nan_to_num, torch.log1p, torch.expm1,
    # same shape as the input, whatever the values: the channels shrink with the input's
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg", "sqrt", "rsqrt",
    "square", "sin", "cos", "erf", "sign", "reciprocal", "clone", "detach", "contiguous", "float", "double",
    "half", "bfloat16", "to", "type", "type_as", "cpu", "cuda", "requires_grad_", "nan_to_num", "log1p",
    "expm1", "exp_", "abs_", "neg_", "clamp_min", "clamp_max", "clamp_min_", "clamp_max_",
]


def _unary(ctx):
    return passthrough(ctx, 0)


rule_for_functions(*_UNARY_FUNCTIONS)(_unary)
rule_for_methods(*_UNARY_METHODS)(_unary)


_BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.maximum,
    torch.minimum, torch.pow, operator.pow, torch.where, torch.fmod, torch.remainder, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.masked_fill, torch.atan2, torch.hypot, operator.floordiv,
    torch.floor_divide, operator.mod, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, torch.logical_and,
    torch.logical_or, operator.and_, operator.or_,
]
_BINARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_", "maximum", "minimum", "where",
    "masked_fill", "masked_fill_", "lerp", "addcmul", "addcdiv", "fmod", "remainder", "eq", "ne", "lt", "le",
    "gt", "ge", "true_divide", "logical_and", "logical_or",
]


def _binary(ctx):
    if not isinstance(ctx.output, Tensor):
        return None  # arithmetic on sizes
    operands = list(ctx.op.args) + [v for k, v in ctx.op.kwargs.items() if k not in ("alpha", "out")]
    return broadcast(ctx, operands, ctx.output.shape)


rule_for_functions(*_BINARY_FUNCTIONS)(_binary)
rule_for_methods(*_BINARY_METHODS)(_binary)
# arithmetic on sizes (x.size(1) // 2): the ones not already element-wise above
rule_for_functions(*(f for f in _INT_OPS if f not in _UNARY_FUNCTIONS and f not in _BINARY_FUNCTIONS))(_binary)


@rule_for_functions(torch.clamp, torch.clip)
@rule_for_methods("clamp", "clamp_", "clip", "clip_")
def _clamp(ctx):
    return broadcast(ctx, list(ctx.op.args) + list(ctx.op.kwargs.values()), ctx.output.shape)


# --------------------------------------------------------------------------------------------------
# Softmax-like (normalise over a dimension), reductions
# --------------------------------------------------------------------------------------------------


@rule_for_functions(torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, F.softmin, torch.cumsum, torch.cumprod,
     F.normalize, F.gumbel_softmax)
@rule_for_methods("softmax", "log_softmax", "cumsum", "cumprod")
def _along_dim(ctx):
    x_arg = ctx.raw(0, "input")
    value = ctx.value(x_arg)
    name = getattr(ctx.op.target, "__name__", ctx.op.target)
    default = 1 if name == "normalize" else None
    dim = ctx.arg(1 if name != "normalize" else 2, "dim", default)
    if name == "normalize" and len(ctx.op.args) > 2:
        dim = ctx.arg(2)
    if dim is None:
        dim = 0 if value.ndim in (0, 1, 3) else 1  # torch's legacy implicit softmax dim
    d = norm_dim(dim, value.ndim)
    return keep_dims(ctx, ctx.dims(x_arg), [d], f"normalises over dimension {d}, which carries channels")


_REDUCTIONS = ["mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "all", "any",
               "argmax", "argmin", "nansum", "nanmean", "count_nonzero"]


def _reduction(ctx):
    x_arg = ctx.raw(0, "input")
    name = ctx.op.target if isinstance(ctx.op.target, str) else ctx.op.target.__name__
    dim_pos = 2 if name == "norm" else 1
    dims = ctx.raw(dim_pos, "dim")
    if name == "norm" and dims is None and len(ctx.op.args) > 2:
        dims = ctx.op.args[2]
    if isinstance(dims, (torch.dtype,)):
        dims = None
    keepdim = bool(ctx.value(ctx.raw(dim_pos + 1, "keepdim", False)) or ctx.op.kwargs.get("keepdim", False))
    if name == "norm":
        keepdim = bool(ctx.op.kwargs.get("keepdim", False) or (len(ctx.op.args) > 3 and ctx.value(ctx.op.args[3])))
    out = reduce_dims(ctx, x_arg, ctx.value(dims), keepdim)
    if isinstance(ctx.output, (tuple, list)):
        return [dict(out) for _ in ctx.output]
    return out


rule_for_methods(*_REDUCTIONS)(_reduction)
rule_for_functions(*(getattr(torch, name) for name in _REDUCTIONS if hasattr(torch, name)))(_reduction)


@rule_for_functions(torch.max, torch.min)
@rule_for_methods("max", "min")
def _max_min(ctx):
    second = ctx.value(ctx.raw(1, "other"))
    if isinstance(second, Tensor):
        return broadcast(ctx, [ctx.raw(0), ctx.raw(1, "other")], ctx.output.shape)
    return _reduction(ctx)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Mish, nn.Softplus, nn.SELU, nn.CELU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Tanhshrink, nn.Softsign,
    nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.RReLU,
)


@rule_for_modules(*_ACTIVATION_MODULES)
def _activation_module(ctx):
    return passthrough(ctx, 0)



@rule_for_modules(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def _softmax_module(ctx):
    x_arg = first_input(ctx)
    value = ctx.value(x_arg)
    dim = ctx.module.dim
    if dim is None:
        dim = 0 if value.ndim in (0, 1, 3) else 1
    d = norm_dim(dim, value.ndim)
    return keep_dims(ctx, ctx.dims(x_arg), [d], f"normalises over dimension {d}, which carries channels")


@rule_for_modules(nn.Softmax2d)
def _softmax2d_module(ctx):
    x_arg = first_input(ctx)
    d = ctx.value(x_arg).ndim - 3
    return keep_dims(ctx, ctx.dims(x_arg), [d], "normalises over the channels")
