"""One explicit rule per operation: how the channel labels of its inputs map to its outputs.

A rule receives a :class:`~prunekit.structured.graph.RuleContext` (the node, its argument values and
labels, the output value) and returns the output's labels: ``{dim: atoms}`` for a tensor, a list of
those for a tuple, ``None`` for a non-tensor. Along the way it says which parameter dimensions read
(``"in"``), write (``"out"``) or pass (``"through"``) the channels, makes atoms equal (``ctx.union``) and
pins what removal could not follow (``ctx.pin``). Every labelled input dimension is either mapped or
pinned; nothing is dropped silently.

Users add rules for their own layers with :func:`register_rule`::

    def rule(ctx):                       # a layer scaling its input per channel by self.gain
        x = ctx.dims(ctx.raw(0))
        ctx.consume(ctx.tensor(ctx.module, "gain"), 0, x.get(1), "through")
        return dict(x)

    prunekit.structured.register_rule(MyGain, rule, attributes=("channels",))
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._types import NONE, ParamRef, UnsupportedOperationError

__all__ = ["ModuleRule", "register_rule", "module_rule", "run_rule", "FUNCTION_RULES", "METHOD_RULES"]


@dataclass(frozen=True)
class ModuleRule:
    """How a layer type maps channels (``rule``), how it updates its attributes after surgery
    (``resize(module, sizes)``, see surgery.py) and which attributes describe its shape (``attributes``,
    saved by ``pk.save`` so that ``pk.load`` can rebuild a pruned model)."""

    rule: Callable[[Any], Any]
    resize: Callable[[nn.Module, Any], None] | None = None
    attributes: tuple[str, ...] = ()


_MODULE_RULES: dict[type, ModuleRule] = {}
FUNCTION_RULES: dict[Any, Callable[[Any], Any]] = {}
METHOD_RULES: dict[str, Callable[[Any], Any]] = {}


def register_rule(
    module_type: type[nn.Module],
    rule: Callable[[Any], Any],
    resize: Callable[[nn.Module, Any], None] | None = None,
    attributes: Sequence[str] = (),
) -> None:
    """Register (or replace) the rule of ``module_type``; the type is then kept whole when tracing.

    ``resize(module, sizes)`` is called after surgery to update the layer's attributes (its parameters
    and buffers are already resized); ``attributes`` are the attribute names that describe its shape.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable, got {rule!r}")
    _MODULE_RULES[module_type] = ModuleRule(rule, resize, tuple(attributes))


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule of ``module``'s type (or of its nearest registered base class)."""
    for cls in type(module).__mro__:
        found = _MODULE_RULES.get(cls)
        if found is not None:
            return found
    return None


def run_rule(ctx) -> Any:
    node = ctx.node
    if node.op == "call_module":
        found = module_rule(ctx.module)
        rule = found.rule if found is not None else None
    elif node.op == "call_method":
        rule = METHOD_RULES.get(node.target)
    else:
        rule = FUNCTION_RULES.get(node.target)
    if rule is None:
        return ctx.graph._unknown(ctx)
    return rule(ctx)


def _fn(*targets):
    def add(rule):
        for target in targets:
            FUNCTION_RULES[target] = rule
        return rule

    return add


def _method(*names):
    def add(rule):
        for name in names:
            METHOD_RULES[name] = rule
        return rule

    return add


def _module(*types, resize=None, attributes=()):
    def add(rule):
        for t in types:
            _MODULE_RULES[t] = ModuleRule(rule, resize, tuple(attributes))
        return rule

    return add


def _none(n: int) -> Tensor:
    return torch.full((n,), NONE, dtype=torch.long)


def _tensor_out(ctx) -> Any:
    """Empty labels shaped like the output."""
    out = ctx.output
    if isinstance(out, Tensor):
        return {}
    if isinstance(out, (tuple, list)):
        return [{} if isinstance(o, Tensor) else None for o in out]
    return None


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


def _norm_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def reduce_dims(ctx, x_arg, dims, keepdim: bool) -> dict:
    """A reduction: labelled reduced dims are pinned; the rest are renumbered."""
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    ndim = value.ndim
    if dims is None:
        dims = list(range(ndim))
    elif isinstance(dims, int):
        dims = [dims]
    dims = sorted({_norm_dim(d, ndim) for d in dims})
    for d in dims:
        if d in x:
            ctx.pin(x[d], f"reduces over dimension {d}, which carries channels")
    out = {}
    for d, l in x.items():
        if d in dims:
            continue
        out[d if keepdim else d - sum(1 for r in dims if r < d)] = l
    return out


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
# Non-tensor helpers: sizes, attributes
# --------------------------------------------------------------------------------------------------


@_method("size", "dim", "numel", "nelement", "ndimension", "element_size", "get_device", "is_contiguous",
         "is_floating_point", "data_ptr", "stride", "storage_offset", "item", "tolist")
def _meta(ctx):
    return None


@_fn(getattr)
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
        return ctx.graph._unknown(ctx)
    return None


_INT_OPS = [operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
            operator.neg, operator.pow, int, float, math.ceil, math.floor, math.sqrt, operator.eq,
            operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.not_, operator.and_,
            operator.or_]


def _scalar_or_elementwise(ctx):
    values = [ctx.value(a) for a in ctx.node.args]
    if not any(isinstance(v, Tensor) for v in values):
        return None
    return broadcast(ctx, list(ctx.node.args), ctx.output.shape)


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
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg", "sqrt", "rsqrt",
    "square", "sin", "cos", "erf", "sign", "reciprocal", "clone", "detach", "contiguous", "float", "double",
    "half", "bfloat16", "to", "type", "type_as", "cpu", "cuda", "requires_grad_", "nan_to_num", "log1p",
    "expm1", "exp_", "abs_", "neg_", "clamp_min", "clamp_max", "clamp_min_", "clamp_max_",
]


def _unary(ctx):
    return passthrough(ctx, 0)


for _f in _UNARY_FUNCTIONS:
    FUNCTION_RULES[_f] = _unary
for _m in _UNARY_METHODS:
    METHOD_RULES[_m] = _unary


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
    operands = list(ctx.node.args) + [v for k, v in ctx.node.kwargs.items() if k not in ("alpha", "out")]
    return broadcast(ctx, operands, ctx.output.shape)


for _f in _BINARY_FUNCTIONS:
    FUNCTION_RULES[_f] = _binary
for _m in _BINARY_METHODS:
    METHOD_RULES[_m] = _binary
for _f in _INT_OPS:
    FUNCTION_RULES.setdefault(_f, _binary)


@_fn(torch.clamp, torch.clip)
@_method("clamp", "clamp_", "clip", "clip_")
def _clamp(ctx):
    return broadcast(ctx, list(ctx.node.args) + list(ctx.node.kwargs.values()), ctx.output.shape)


# --------------------------------------------------------------------------------------------------
# Softmax-like (normalise over a dimension), reductions
# --------------------------------------------------------------------------------------------------


@_fn(torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, F.softmin, torch.cumsum, torch.cumprod,
     F.normalize, F.gumbel_softmax)
@_method("softmax", "log_softmax", "cumsum", "cumprod")
def _along_dim(ctx):
    x_arg = ctx.raw(0, "input")
    value = ctx.value(x_arg)
    name = getattr(ctx.node.target, "__name__", ctx.node.target)
    default = 1 if name == "normalize" else None
    dim = ctx.arg(1 if name != "normalize" else 2, "dim", default)
    if name == "normalize" and len(ctx.node.args) > 2:
        dim = ctx.arg(2)
    if dim is None:
        dim = 0 if value.ndim in (0, 1, 3) else 1  # torch's legacy implicit softmax dim
    d = _norm_dim(dim, value.ndim)
    return keep_dims(ctx, ctx.dims(x_arg), [d], f"normalises over dimension {d}, which carries channels")


_REDUCTIONS = ["mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "all", "any",
               "argmax", "argmin", "nansum", "nanmean", "count_nonzero"]


def _reduction(ctx):
    x_arg = ctx.raw(0, "input")
    name = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
    dim_pos = 2 if name == "norm" else 1
    dims = ctx.raw(dim_pos, "dim")
    if name == "norm" and dims is None and len(ctx.node.args) > 2:
        dims = ctx.node.args[2]
    if isinstance(dims, (torch.dtype,)):
        dims = None
    keepdim = bool(ctx.value(ctx.raw(dim_pos + 1, "keepdim", False)) or ctx.node.kwargs.get("keepdim", False))
    if name == "norm":
        keepdim = bool(ctx.node.kwargs.get("keepdim", False) or (len(ctx.node.args) > 3 and ctx.value(ctx.node.args[3])))
    out = reduce_dims(ctx, x_arg, ctx.value(dims), keepdim)
    if isinstance(ctx.output, (tuple, list)):
        return [dict(out) for _ in ctx.output]
    return out


for _name in _REDUCTIONS:
    METHOD_RULES[_name] = _reduction
    if hasattr(torch, _name):
        FUNCTION_RULES[getattr(torch, _name)] = _reduction


@_fn(torch.max, torch.min)
@_method("max", "min")
def _max_min(ctx):
    second = ctx.value(ctx.raw(1, "other"))
    if isinstance(second, Tensor):
        return broadcast(ctx, [ctx.raw(0), ctx.raw(1, "other")], ctx.output.shape)
    return _reduction(ctx)


# --------------------------------------------------------------------------------------------------
# Shape operations
# --------------------------------------------------------------------------------------------------


@_fn(torch.permute)
@_method("permute")
def _permute(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    order = ctx.value(list(ctx.node.args[1:])) if len(ctx.node.args) > 1 else ctx.value(ctx.node.kwargs["dims"])
    if len(order) == 1 and isinstance(order[0], (list, tuple)):
        order = order[0]
    order = [_norm_dim(d, nd) for d in order]
    x = ctx.dims(x_arg)
    return {order.index(d): l for d, l in x.items()}


@_fn(torch.transpose, torch.swapaxes, torch.swapdims)
@_method("transpose", "swapaxes", "swapdims", "transpose_")
def _transpose(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    a, b = _norm_dim(ctx.arg(1, "dim0"), nd), _norm_dim(ctx.arg(2, "dim1"), nd)
    return {({a: b, b: a}.get(d, d)): l for d, l in ctx.dims(x_arg).items()}


@_fn(torch.t)
@_method("t")
def _t(ctx):
    x_arg = ctx.raw(0)
    if ctx.value(x_arg).ndim < 2:
        return dict(ctx.dims(x_arg))
    return {1 - d: l for d, l in ctx.dims(x_arg).items()}


@_fn(torch.movedim, torch.moveaxis)
@_method("movedim", "moveaxis")
def _movedim(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [_norm_dim(s, nd) for s in src]
    dst = [_norm_dim(s, nd) for s in dst]
    order = [None] * nd
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(d for d in range(nd) if d not in src)
    order = [o if o is not None else next(rest) for o in order]
    return {order.index(d): l for d, l in ctx.dims(x_arg).items()}


@_fn(torch.unsqueeze)
@_method("unsqueeze", "unsqueeze_")
def _unsqueeze(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    dim = ctx.arg(1, "dim")
    dim = dim % (nd + 1)
    return {(d + 1 if d >= dim else d): l for d, l in ctx.dims(x_arg).items()}


@_fn(torch.squeeze)
@_method("squeeze", "squeeze_")
def _squeeze(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    dim = ctx.arg(1, "dim")
    x = ctx.dims(x_arg)
    if dim is None:
        dims = [d for d in range(value.ndim) if value.shape[d] == 1]
        for d, l in x.items():  # a channel dim squeezed away once pruned down to one channel
            if d not in dims:
                ctx.pin(l, "squeeze() without a dim would drop this channel dimension at size 1")
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = [_norm_dim(d, value.ndim) for d in dims if value.shape[_norm_dim(d, value.ndim)] == 1]
    return {d - sum(1 for s in dims if s < d): l for d, l in x.items() if d not in dims}


@_fn(torch.flip)
@_method("flip")
def _flip(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    dims = ctx.arg(1, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = {_norm_dim(d, nd) for d in dims}
    return {d: (l.flip(0) if d in dims else l) for d, l in ctx.dims(x_arg).items()}


@_fn(torch.roll)
@_method("roll")
def _roll(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    dims = ctx.arg(2, "dims")
    x = ctx.dims(x_arg)
    dims = range(nd) if dims is None else ([dims] if isinstance(dims, int) else dims)
    return keep_dims(ctx, x, [_norm_dim(d, nd) for d in dims], "rolls a channel dimension by a fixed shift")


@_method("repeat")
def _repeat(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    reps = ctx.value(list(ctx.node.args[1:]))
    if len(reps) == 1 and isinstance(reps[0], (list, tuple, torch.Size)):
        reps = list(reps[0])
    lead = len(reps) - value.ndim
    return {d + lead: l.repeat(int(reps[d + lead])) for d, l in ctx.dims(x_arg).items()}


@_method("expand", "expand_as", "broadcast_to")
@_fn(torch.broadcast_to)
def _expand(ctx):
    operands = [ctx.raw(0)]
    if ctx.node.target == "expand_as":
        operands.append(ctx.raw(1))
    x = broadcast(ctx, operands, ctx.output.shape)
    value = ctx.value(ctx.raw(0))
    lead = ctx.output.ndim - value.ndim
    if ctx.node.target in ("expand", "broadcast_to") or ctx.node.target is torch.broadcast_to:
        sizes = list(ctx.node.args[1:]) if ctx.node.target == "expand" else [ctx.raw(1, "size")]
        if len(sizes) == 1 and isinstance(ctx.value(sizes[0]), (list, tuple, torch.Size)):
            sizes = sizes[0] if isinstance(sizes[0], (list, tuple)) else [None] * ctx.output.ndim
        for d, l in list(x.items()):
            arg = sizes[d] if d < len(sizes) else None
            if d - lead >= 0 and value.shape[d - lead] > 1 and not (arg == -1 or _tainted(ctx, arg)):
                ctx.pin(l, "expands to a size written in forward()")
    return x


def _tainted(ctx, arg) -> bool:
    return isinstance(arg, fx.Node) and bool(ctx.graph._taint.get(arg))


class _CannotEvaluate(Exception):
    pass


def _reeval(ctx, arg, subst: dict) -> Any:
    """Re-evaluate a size expression with some (tensor node, dim) sizes replaced."""
    graph = ctx.graph
    if isinstance(arg, (list, tuple)):
        return type(arg)(_reeval(ctx, a, subst) for a in arg)
    if not isinstance(arg, fx.Node):
        return arg
    if not graph._taint.get(arg):
        return graph._values[arg]
    if (arg.op == "call_method" and arg.target == "size") or (
        arg.op == "call_function" and arg.target is getattr and arg.args[1] == "shape"
    ):
        source = arg.args[0]
        shape = list(graph._values[source].shape)
        for (node, d), n in subst.items():
            if node is source:
                shape[d] = n
        dim = arg.args[1] if arg.op == "call_method" and len(arg.args) > 1 else arg.kwargs.get("dim")
        return torch.Size(shape) if dim is None else shape[dim]
    if arg.op == "call_method" and arg.target == "numel":
        source = arg.args[0]
        shape = list(graph._values[source].shape)
        for (node, d), n in subst.items():
            if node is source:
                shape[d] = n
        return math.prod(shape)
    args = _reeval(ctx, arg.args, subst)
    kwargs = {k: _reeval(ctx, v, subst) for k, v in arg.kwargs.items()}
    if arg.op == "call_function":
        return arg.target(*args, **kwargs)
    if arg.op == "call_method":
        return getattr(args[0], arg.target)(*args[1:], **kwargs)
    raise _CannotEvaluate(arg.name)


def _size_entries(ctx, raw_sizes: list) -> list:
    """Normalise the shape arguments of view/reshape into one entry per output dim."""
    if len(raw_sizes) == 1:
        single = raw_sizes[0]
        value = ctx.value(single)
        if isinstance(value, (list, tuple, torch.Size)):
            if isinstance(single, fx.Node):
                return [("elem", single, i) for i in range(len(value))]
            return list(single)
    return list(raw_sizes)


def _entry_elastic(ctx, entry) -> bool:
    if isinstance(entry, tuple) and len(entry) == 3 and entry[0] == "elem":
        node, i = entry[1], entry[2]
        nd = len(ctx.value(node))
        return any(t[1] == i % nd for t in ctx.graph._taint.get(node, ())) if _is_size_node(node) else _tainted(ctx, node)
    if isinstance(entry, tuple) and entry and entry[0] == "pass":
        return True
    if isinstance(entry, int):
        return entry == -1
    return _tainted(ctx, entry)


def _is_size_node(node) -> bool:
    return (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function" and node.target is getattr and node.args[1] == "shape"
    )


def _entry_value(ctx, entry, subst) -> Any:
    if isinstance(entry, tuple) and len(entry) == 3 and entry[0] == "elem":
        return _reeval(ctx, entry[1], subst)[entry[2]]
    return _reeval(ctx, entry, subst)


def reshape_rule(ctx, x_arg, entries: list | None, op: str) -> dict:
    """view / reshape / flatten / unflatten: follow each channel dimension through the reshape.

    ``entries`` are the output sizes as written in forward() (``None``: every output size follows the
    input, as in flatten). A channel dimension may land on several output dims (a channel shuffle
    splits C into (g, C/g)); exactly one of them must follow the channel count (``-1`` or a size
    computed from the tensor, e.g. ``c // g``): the channels along the others are coupled, and the
    new sizes are re-evaluated to check that they follow a removal. Otherwise the channels are pinned.
    """
    value = ctx.value(x_arg)
    out_shape = tuple(ctx.output.shape)
    x = ctx.dims(x_arg)
    result: dict[int, Tensor] = {}
    for d, labels in x.items():
        view = [1] * value.ndim
        view[d] = value.shape[d]
        probe = labels.view(view).expand(value.shape).reshape(out_shape)
        varying = [v for v in range(len(out_shape)) if out_shape[v] > 1 and not bool((probe == probe.narrow(v, 0, 1)).all())]
        if not varying:
            ctx.pin(labels, f"{op} collapses the channel dimension")
            continue
        elastic = varying if entries is None else [v for v in varying if _entry_elastic(ctx, entries[v])]
        if len(elastic) != 1:
            ctx.pin(labels, f"{op} to sizes written in forward(): the channel count cannot change "
                            "(compute the size from the tensor, e.g. x.size(1), or use -1)")
            continue
        e = elastic[0]
        P = probe
        for v in range(len(out_shape)):
            if v not in varying:
                P = P.narrow(v, 0, 1)
        P = P.movedim(e, 0).reshape(out_shape[e], -1)
        if P.shape[1] > 1:
            ctx.union(P[:, :1].expand_as(P), P)
        along = P[:, 0].clone()
        if entries is not None and not _reshape_follows(ctx, x_arg, d, labels, P, e, entries, out_shape):
            ctx.pin(labels, f"{op}: the new shape does not follow a removal of channels")
            continue
        if e in result:
            ctx.pin(result.pop(e), f"{op} merges two channel dimensions")
            ctx.pin(along, f"{op} merges two channel dimensions")
            continue
        result[e] = along
    return result


def _reshape_follows(ctx, x_arg, d, labels, P, e, entries, out_shape) -> bool:
    """Remove the first unit (the atoms at position 0 of the elastic dim, closed over repeats) and
    check the shape arguments, re-evaluated, give the original shape minus that unit."""
    unit = P[0].unique()
    rows = torch.isin(P, unit).any(1)
    for _ in range(8):
        unit = P[rows].unique()
        grown = torch.isin(P, unit).any(1)
        if torch.equal(grown, rows):
            break
        rows = grown
    removed_positions = int(rows.sum())
    value = ctx.value(x_arg)
    kept_in = int((~torch.isin(labels, unit)).sum())
    subst = {}
    taints = set()
    for entry in entries:
        node = entry[1] if isinstance(entry, tuple) and len(entry) == 3 and entry[0] == "elem" else entry
        if isinstance(node, fx.Node):
            taints |= set(ctx.graph._taint.get(node, ()))
    for source, dim in taints:
        lab = ctx.graph._labels.get(source, {})
        if not isinstance(lab, dict) or dim not in lab:
            return False
        subst[(source, dim)] = int((~torch.isin(lab[dim], unit)).sum())
    numel = value.numel() // value.shape[d] * kept_in
    try:
        new = []
        for i, entry in enumerate(entries):
            if isinstance(entry, tuple) and entry and entry[0] == "pass":
                new.append(out_shape[i] if i != e else out_shape[i] - removed_positions)
            else:
                new.append(int(_entry_value(ctx, entry, subst)))
    except Exception:
        return False
    if new.count(-1) > 1:
        return False
    if -1 in new:
        rest = math.prod(n for n in new if n != -1)
        if rest == 0 or numel % rest:
            return False
        new[new.index(-1)] = numel // rest
    expected = list(out_shape)
    expected[e] -= removed_positions
    return new == expected


@_method("view", "reshape")
@_fn(torch.reshape)
def _view(ctx):
    x_arg = ctx.raw(0)
    if ctx.node.op == "call_function":
        sizes = [ctx.raw(1, "shape")]
    else:
        sizes = list(ctx.node.args[1:]) or [ctx.node.kwargs.get("shape", ctx.node.kwargs.get("size"))]
    if len(sizes) == 1 and isinstance(ctx.value(sizes[0]), torch.dtype):
        return ctx.graph._unknown(ctx)
    return reshape_rule(ctx, x_arg, _size_entries(ctx, sizes), f".{ctx.node.target}()" if isinstance(ctx.node.target, str) else "reshape")


@_method("view_as", "reshape_as")
def _view_as(ctx):
    other = ctx.raw(1)
    nd = ctx.value(other).ndim
    other_lab = ctx.dims(other)
    x = reshape_rule(ctx, ctx.raw(0), [("pass",) if d in other_lab else ctx.value(other).shape[d] for d in range(nd)],
                     f".{ctx.node.target}()")
    for d, l in list(x.items()):
        if d in other_lab:
            ctx.union(l, other_lab[d])
    return x


@_fn(torch.flatten)
@_method("flatten")
def _flatten(ctx):
    return reshape_rule(ctx, ctx.raw(0), None, "flatten")


@_method("unflatten")
@_fn(torch.unflatten)
def _unflatten(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    dim = _norm_dim(ctx.arg(1, "dim"), value.ndim)
    sizes = ctx.raw(2, "sizes")
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [("elem", sizes, i) for i in range(len(ctx.value(sizes)))]
    entries = [("pass",)] * dim + sizes + [("pass",)] * (value.ndim - dim - 1)
    return reshape_rule(ctx, x_arg, entries, "unflatten")


def _pixel_shuffle(ctx, factor: int, inverse: bool) -> dict:
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    c = value.ndim - 3
    out = {}
    for d, l in x.items():
        if d != c:
            if d > c:
                ctx.pin(l, "pixel (un)shuffle rearranges this dimension")
            else:
                out[d] = l
            continue
        if inverse:
            out[d] = l.repeat_interleave(factor * factor)
        else:
            blocks = l.view(-1, factor * factor)
            ctx.union(blocks[:, :1].expand_as(blocks), blocks)
            out[d] = blocks[:, 0].clone()
    return out


@_fn(F.pixel_shuffle, torch.pixel_shuffle)
def _f_pixel_shuffle(ctx):
    return _pixel_shuffle(ctx, ctx.arg(1, "upscale_factor"), False)


@_fn(F.pixel_unshuffle, torch.pixel_unshuffle)
def _f_pixel_unshuffle(ctx):
    return _pixel_shuffle(ctx, ctx.arg(1, "downscale_factor"), True)


@_fn(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx):
    tensors = ctx.raw(0, "tensors")
    values = ctx.value(tensors)
    ndim = ctx.output.ndim
    dim = _norm_dim(ctx.arg(1, "dim", 0), ndim)
    out = broadcast(ctx, list(tensors), ctx.output.shape, skip=[dim])
    parts, any_labels = [], False
    for arg, v in zip(tensors, values):
        if v.ndim == 1 and v.numel() == 0:
            continue
        lab = ctx.dims(arg)
        if dim in lab:
            any_labels = True
            parts.append(lab[dim])
        else:
            parts.append(_none(v.shape[dim]))
    if any_labels:
        out[dim] = torch.cat(parts)
    return out


@_fn(torch.stack)
def _stack(ctx):
    tensors = ctx.raw(0, "tensors")
    ndim = ctx.output.ndim
    dim = _norm_dim(ctx.arg(1, "dim", 0), ndim)
    inner = broadcast(ctx, list(tensors), ctx.value(tensors)[0].shape)
    return {(d + 1 if d >= dim else d): l for d, l in inner.items()}


def _chunks_equal(ctx, x_arg, dim: int, n_chunks: int, what: str, size_arg=None) -> list:
    """chunk / equal split along a channel dimension: channel i of every chunk is coupled."""
    x = ctx.dims(x_arg)
    outputs = ctx.output
    result = [dict() for _ in outputs]
    for d, l in x.items():
        for i, o in enumerate(outputs):
            if d != dim:
                result[i][d] = l
    if dim not in x:
        return result
    labels = x[dim]
    sizes = [o.shape[dim] for o in outputs]
    if len(set(sizes)) != 1:
        ctx.pin(labels, f"{what} into unequal parts: the parts could not shrink evenly")
        return result
    blocks = labels.view(len(sizes), sizes[0])
    ctx.union(blocks[:1].expand_as(blocks), blocks)
    if size_arg is not None:  # split(x, size) with a size computed in forward(): check it follows
        unit = blocks[:, 0]
        subst = {}
        for source, sd in ctx.graph._taint.get(size_arg, ()):
            lab = ctx.graph._labels.get(source, {})
            if not isinstance(lab, dict) or sd not in lab:
                subst = None
                break
            subst[(source, sd)] = int((~torch.isin(lab[sd], unit)).sum())
        try:
            follows = subst is not None and int(_reeval(ctx, size_arg, subst)) == sizes[0] - 1
        except Exception:
            follows = False
        if not follows:
            ctx.pin(labels, f"{what}: the split size does not follow a removal of channels")
    for i in range(len(outputs)):
        result[i][dim] = blocks[i].clone()
    return result


@_fn(torch.chunk)
@_method("chunk")
def _chunk(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    chunks = ctx.arg(1, "chunks")
    dim = _norm_dim(ctx.arg(2, "dim", 0), value.ndim)
    x = ctx.dims(x_arg)
    if dim in x and value.shape[dim] % chunks:
        ctx.pin(x[dim], f"chunk({chunks}) of {value.shape[dim]} channels is uneven")
    return _chunks_equal(ctx, x_arg, dim, chunks, f"chunk({chunks})")


@_fn(torch.split)
@_method("split")
def _split(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    size_raw = ctx.raw(1, "split_size_or_sections", ctx.raw(1, "split_size"))
    dim = _norm_dim(ctx.arg(2, "dim", 0), value.ndim)
    x = ctx.dims(x_arg)
    if dim in x:
        if isinstance(size_raw, fx.Node) and isinstance(ctx.value(size_raw), int) and _tainted(ctx, size_raw):
            return _chunks_equal(ctx, x_arg, dim, len(ctx.output), "split", size_arg=size_raw)
        ctx.pin(x[dim], "split with sizes written in forward(): they cannot follow a removal "
                        "(use chunk(), or compute the size from the tensor, e.g. x.size(1) // 2)")
    result = []
    offset = 0
    for o in ctx.output:
        part = {d: l for d, l in x.items() if d != dim}
        if dim in x:
            part[dim] = x[dim][offset: offset + o.shape[dim]]
        offset += o.shape[dim]
        result.append(part)
    return result


@_fn(torch.unbind)
@_method("unbind")
def _unbind(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    dim = _norm_dim(ctx.arg(1, "dim", 0), value.ndim)
    x = ctx.dims(x_arg)
    if dim in x:
        ctx.pin(x[dim], "unbind over a channel dimension")
    out = {(d - 1 if d > dim else d): l for d, l in x.items() if d != dim}
    return [dict(out) for _ in ctx.output]


@_fn(operator.getitem)
def _getitem(ctx):
    base = ctx.raw(0)
    index = ctx.value(ctx.raw(1))
    labels = ctx.labels(base)
    value = ctx.value(base)
    if not isinstance(value, Tensor):
        if isinstance(labels, list) and isinstance(index, int):
            return labels[index]
        if isinstance(labels, list) and isinstance(index, slice):
            return labels[index]
        return None if not isinstance(ctx.output, Tensor) else {}
    return _index_tensor(ctx, base, value, index)


def _index_tensor(ctx, base, value: Tensor, index) -> dict:
    x = ctx.dims(base)
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(i, (Tensor, list)) or i is True or i is False for i in index):
        for l in x.values():
            ctx.pin(l, "advanced (tensor) indexing")
        return {}
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded += [slice(None)] * (value.ndim - n_real)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (value.ndim - sum(1 for i in expanded if i is not None))
    out, in_dim, out_dim = {}, 0, 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        lab = x.get(in_dim)
        size = value.shape[in_dim]
        if isinstance(i, int):
            if lab is not None:
                ctx.pin(lab, "indexes one channel of a channel dimension")
            in_dim += 1
            continue
        full = (i.start in (None, 0) and (i.stop is None or (isinstance(i.stop, int) and i.stop >= size))
                and i.step in (None, 1))
        if lab is not None:
            if full:
                out[out_dim] = lab
            else:
                ctx.pin(lab, "slices a channel dimension with fixed bounds")
        in_dim += 1
        out_dim += 1
    return out


# --------------------------------------------------------------------------------------------------
# Contractions with parameters: linear, conv, matmul
# --------------------------------------------------------------------------------------------------


def _weight_info(ctx, arg):
    lab = ctx.labels(arg)
    return lab.info if isinstance(lab, ParamRef) else None


def linear_like(ctx, x_arg, w_info, b_info, w_labels: dict | None = None) -> dict:
    """y = x W^T + b over the last dim of x; W's dim 1 reads x's channels, dim 0 writes new ones."""
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    d = value.ndim - 1
    out = {k: l for k, l in x.items() if k != d}
    if w_info is not None:
        ctx.consume(w_info, 1, x.get(d), "in")
        ctx.tap(value, d, x.get(d))
        produced = ctx.param(w_info, 0, "out")
    else:  # a weight computed in forward(): a parameter-free contraction, pinned
        w_labels = w_labels or {}
        if d in x:
            ctx.pin(x[d], "linear with a weight computed in forward(): removal could not follow")
        if 1 in w_labels:
            ctx.pin(w_labels[1], "linear with a weight computed in forward()")
        produced = w_labels.get(0)
    if b_info is not None and produced is not None:
        ctx.consume(b_info, 0, produced, "out")
    if produced is not None:
        out[d] = produced
    return out


@_fn(F.linear)
def _f_linear(ctx):
    w_arg, b_arg = ctx.raw(1, "weight"), ctx.raw(2, "bias")
    w_info = _weight_info(ctx, w_arg)
    w_labels = None if w_info is not None else ctx.dims(w_arg)
    b_info = _weight_info(ctx, b_arg) if b_arg is not None else None
    if b_arg is not None and b_info is None and w_info is not None:
        ctx.pin(ctx.param(w_info, 0, "out"), "linear with a bias computed in forward()")
    return linear_like(ctx, ctx.raw(0, "input"), w_info, b_info, w_labels)


def conv_like(ctx, x_arg, w_info, b_info, groups: int, transposed: bool, n_spatial: int) -> dict:
    """Convolutions, grouped and depthwise included (and their transposes)."""
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    c = value.ndim - n_spatial - 1
    out = {}
    for d, l in x.items():
        if d < c:
            out[d] = l
        elif d > c:
            ctx.pin(l, "convolves over this dimension (spatial), which carries channels")
    L = x.get(c)
    in_channels = value.shape[c]
    if w_info is None:
        if L is not None:
            ctx.pin(L, "convolution with a weight computed in forward()")
        return out
    w = w_info.tensor
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    per_group_in = in_channels // groups
    if groups == 1:
        ctx.consume(w_info, in_dim, L, "in")
        ctx.tap(value, c, L)
        produced = ctx.param(w_info, out_dim, "out")
    elif per_group_in == 1 and not transposed:
        # depthwise: input channel j feeds output channels j*m .. j*m+m-1 and nothing else
        m = w.shape[0] // groups
        if L is None:
            L = _none(in_channels)
        produced = L.repeat_interleave(m)
        ctx.consume(w_info, 0, produced, "through")
    elif transposed and per_group_in == 1:
        m = w.shape[1]
        if L is None:
            L = _none(in_channels)
        ctx.consume(w_info, 0, L, "through")
        produced = L.repeat_interleave(m)
    else:
        # grouped: every group keeps the same number of inputs and outputs, so position r of every
        # group goes together (on each side)
        if L is None:
            L = _none(in_channels)
        blocks = L.view(groups, per_group_in)
        ctx.union(blocks[:1].expand_as(blocks), blocks)
        ctx.tap(value, c, L)
        if transposed:
            ctx.consume(w_info, 0, L, "in")
            produced = ctx.param(w_info, 1, "out").repeat(groups)
        else:
            ctx.consume(w_info, 1, blocks[0].clone(), "in")
            per_group_out = w.shape[0] // groups
            own = ctx.param(w_info, 0, "out").view(groups, per_group_out)
            ctx.union(own[:1].expand_as(own), own)
            produced = own[0].repeat(groups)
    if b_info is not None:
        ctx.consume(b_info, 0, produced, "out" if groups == 1 or per_group_in > 1 else "through")
    out[c] = produced
    return out


def _f_conv(n_spatial: int, transposed: bool):
    def rule(ctx):
        w_arg, b_arg = ctx.raw(1, "weight"), ctx.raw(2, "bias")
        groups = ctx.arg(6, "groups", 1)  # conv*d and conv_transpose*d both take groups 7th
        w_info = _weight_info(ctx, w_arg)
        b_info = _weight_info(ctx, b_arg) if b_arg is not None else None
        if w_info is None:
            for l in ctx.dims(w_arg).values():
                ctx.pin(l, "convolution with a weight computed in forward()")
        return conv_like(ctx, ctx.raw(0, "input"), w_info, b_info, groups, transposed, n_spatial)

    return rule


FUNCTION_RULES[F.conv1d] = FUNCTION_RULES[torch.conv1d] = _f_conv(1, False)
FUNCTION_RULES[F.conv2d] = FUNCTION_RULES[torch.conv2d] = _f_conv(2, False)
FUNCTION_RULES[F.conv3d] = FUNCTION_RULES[torch.conv3d] = _f_conv(3, False)
FUNCTION_RULES[F.conv_transpose1d] = _f_conv(1, True)
FUNCTION_RULES[F.conv_transpose2d] = _f_conv(2, True)
FUNCTION_RULES[F.conv_transpose3d] = _f_conv(3, True)


@_fn(torch.matmul, operator.matmul, torch.mm, torch.bmm)
@_method("matmul", "mm", "bmm")
def _matmul(ctx):
    a_arg, b_arg = ctx.raw(0), ctx.raw(1)
    a_val, b_val = ctx.value(a_arg), ctx.value(b_arg)
    a_ref, b_ref = _weight_info(ctx, a_arg), _weight_info(ctx, b_arg)
    out_nd = ctx.output.ndim
    if a_val.ndim < 2 or b_val.ndim < 2:
        for l in list(ctx.dims(a_arg).values()) + list(ctx.dims(b_arg).values()):
            ctx.pin(l, "matrix-vector product over channels")
        return {}
    ka, kb = a_val.ndim - 1, b_val.ndim - 2  # contracted dims
    out = {}
    if b_ref is not None and a_ref is None:
        a = ctx.dims(a_arg)
        ctx.consume(b_ref, kb, a.get(ka), "in")
        ctx.tap(a_val, ka, a.get(ka))
        for d, l in a.items():
            if d < ka:
                out[d + out_nd - a_val.ndim] = l
        out[out_nd - 1] = ctx.param(b_ref, b_val.ndim - 1, "out")
        for d in range(b_val.ndim - 2):
            if b_val.shape[d] > 1:
                ctx.pin(ctx.param(b_ref, d, "through"), "batched matmul with a parameter")
        return out
    if a_ref is not None and b_ref is None:
        b = ctx.dims(b_arg)
        ctx.consume(a_ref, ka, b.get(kb), "in")
        ctx.tap(b_val, kb, b.get(kb))
        for d, l in b.items():
            if d == b_val.ndim - 1:
                out[out_nd - 1] = l
            elif d < kb:
                out[d + out_nd - b_val.ndim] = l
        out[out_nd - 2] = ctx.param(a_ref, a_val.ndim - 2, "out")
        for d in range(a_val.ndim - 2):
            if a_val.shape[d] > 1:
                ctx.pin(ctx.param(a_ref, d, "through"), "batched matmul with a parameter")
        return out
    a, b = ctx.dims(a_arg), ctx.dims(b_arg)
    for lab, k in ((a, ka), (b, kb)):
        if k in lab:
            ctx.pin(lab[k], "matmul between activations contracts over this channel dimension")
    # batch dims broadcast like an element-wise op
    batch_a = {d: l for d, l in a.items() if d < a_val.ndim - 2}
    batch_b = {d: l for d, l in b.items() if d < b_val.ndim - 2}
    if batch_a or batch_b:
        for d, l in batch_a.items():
            out[d + out_nd - a_val.ndim] = l
        for d, l in batch_b.items():
            od = d + out_nd - b_val.ndim
            if od in out:
                ctx.union(out[od], l)
            else:
                out[od] = l
    if a_val.ndim - 2 in a:
        out[out_nd - 2] = a[a_val.ndim - 2]
    if b_val.ndim - 1 in b:
        out[out_nd - 1] = b[b_val.ndim - 1]
    return out


@_fn(F.scaled_dot_product_attention)
def _sdpa(ctx):
    q_arg, k_arg, v_arg = ctx.raw(0, "query"), ctx.raw(1, "key"), ctx.raw(2, "value")
    q, k, v = ctx.dims(q_arg), ctx.dims(k_arg), ctx.dims(v_arg)
    nq, nk, nv = (ctx.value(a).ndim for a in (q_arg, k_arg, v_arg))
    for lab, d, why in ((q, nq - 1, "query features"), (k, nk - 1, "key features"), (k, nk - 2, "keys"),
                        (v, nv - 2, "values' sequence")):
        if d in lab:
            ctx.pin(lab[d], f"attention contracts over the {why}")
    mask = ctx.raw(3, "attn_mask")
    if isinstance(mask, fx.Node):
        for l in ctx.dims(mask).values():
            ctx.pin(l, "attention mask")
    out = {}
    nd = ctx.output.ndim
    batch = broadcast(ctx, [q_arg, k_arg, v_arg], ctx.output.shape, skip=[nd - 2, nd - 1]) if nd > 2 else {}
    out.update(batch)
    if nq - 2 in q:
        out[nd - 2] = q[nq - 2]
    if nv - 1 in v:
        out[nd - 1] = v[nv - 1]
    return out


# --------------------------------------------------------------------------------------------------
# Functional norms and embeddings
# --------------------------------------------------------------------------------------------------


def per_channel_norm(ctx, x_arg, tensors: Sequence[Any], channel_dim: int = 1) -> dict:
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    c = channel_dim if value.ndim > 1 else 0
    for info in tensors:
        if info is not None:
            ctx.consume(info, 0, x.get(c), "through")
    return dict(x)


@_fn(F.batch_norm, F.instance_norm)
def _f_batch_norm(ctx):
    name = ctx.node.target.__name__
    if name == "batch_norm":
        tensors = [ctx.raw(1, "running_mean"), ctx.raw(2, "running_var"), ctx.raw(3, "weight"), ctx.raw(4, "bias")]
    else:
        tensors = [ctx.raw(1, "running_mean"), ctx.raw(2, "running_var"), ctx.raw(3, "weight"), ctx.raw(4, "bias")]
    infos = []
    for t in tensors:
        if t is None:
            continue
        info = _weight_info(ctx, t)
        if info is None:
            for l in ctx.dims(ctx.raw(0, "input")).values():
                ctx.pin(l, "normalisation with statistics computed in forward()")
        infos.append(info)
    return per_channel_norm(ctx, ctx.raw(0, "input"), infos)


def group_norm_like(ctx, x_arg, num_groups: int, w_info, b_info) -> dict:
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    c = 1 if value.ndim > 1 else 0
    L = x.get(c)
    if L is not None:
        blocks = L.view(num_groups, -1)  # a normalisation group goes whole: its statistics are shared
        ctx.union(blocks[:, :1].expand_as(blocks), blocks)
    for info in (w_info, b_info):
        if info is not None:
            ctx.consume(info, 0, L, "through")
    return dict(x)


@_fn(F.group_norm)
def _f_group_norm(ctx):
    w, b = ctx.raw(2, "weight"), ctx.raw(3, "bias")
    return group_norm_like(ctx, ctx.raw(0, "input"), ctx.arg(1, "num_groups"),
                           _weight_info(ctx, w) if w is not None else None,
                           _weight_info(ctx, b) if b is not None else None)


def layer_norm_like(ctx, x_arg, n_norm: int, w_info, b_info) -> dict:
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    first = value.ndim - n_norm
    for d, l in x.items():
        if d >= first:
            ctx.pin(l, "LayerNorm normalises over this dimension: removing a channel would change its mean "
                       "and variance")
    for info in (w_info, b_info):
        if info is not None:
            for k in range(n_norm):
                ctx.consume(info, k, x.get(first + k), "through")
    return dict(x)


@_fn(F.layer_norm, F.rms_norm)
def _f_layer_norm(ctx):
    shape = ctx.arg(1, "normalized_shape")
    n = 1 if isinstance(shape, int) else len(shape)
    w, b = ctx.raw(2, "weight"), ctx.raw(3, "bias") if ctx.node.target is F.layer_norm else None
    return layer_norm_like(ctx, ctx.raw(0, "input"), n, _weight_info(ctx, w) if w is not None else None,
                           _weight_info(ctx, b) if b is not None else None)


def embedding_like(ctx, idx_arg, w_info) -> dict:
    value = ctx.value(idx_arg)
    idx = ctx.dims(idx_arg)
    for l in idx.values():
        ctx.pin(l, "used as embedding indices")
    if w_info is None:
        return {}
    vocab = ctx.param(w_info, 0, "through")
    ctx.pin(vocab, "embedding rows are token ids (the vocabulary keeps its size)")
    return {value.ndim: ctx.param(w_info, 1, "out")}


@_fn(F.embedding)
def _f_embedding(ctx):
    return embedding_like(ctx, ctx.raw(0, "input"), _weight_info(ctx, ctx.raw(1, "weight")))


# --------------------------------------------------------------------------------------------------
# Pooling and resampling (functional)
# --------------------------------------------------------------------------------------------------

for _name, _n in [("max_pool1d", 1), ("max_pool2d", 2), ("max_pool3d", 3), ("avg_pool1d", 1), ("avg_pool2d", 2),
                  ("avg_pool3d", 3), ("adaptive_avg_pool1d", 1), ("adaptive_avg_pool2d", 2),
                  ("adaptive_avg_pool3d", 3), ("adaptive_max_pool1d", 1), ("adaptive_max_pool2d", 2),
                  ("adaptive_max_pool3d", 3), ("lp_pool1d", 1), ("lp_pool2d", 2), ("lp_pool3d", 3),
                  ("max_pool1d_with_indices", 1), ("max_pool2d_with_indices", 2), ("max_pool3d_with_indices", 3),
                  ("adaptive_max_pool2d_with_indices", 2), ("fractional_max_pool2d", 2)]:
    for _owner in (F, torch):
        if hasattr(_owner, _name):
            FUNCTION_RULES[getattr(_owner, _name)] = (lambda n: lambda ctx: spatial(ctx, ctx.raw(0, "input"), n))(_n)


@_fn(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
def _interpolate(ctx):
    x_arg = ctx.raw(0, "input")
    return spatial(ctx, x_arg, ctx.value(x_arg).ndim - 2)


@_fn(F.pad)
def _pad(ctx):
    x_arg = ctx.raw(0, "input")
    value = ctx.value(x_arg)
    pad = ctx.arg(1, "pad")
    padded = [value.ndim - 1 - i // 2 for i, p in enumerate(pad) if p]
    x = ctx.dims(x_arg)
    return keep_dims(ctx, x, sorted(set(padded)), "pads a channel dimension") | {}


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


def _first(ctx):
    return ctx.raw(0, "input")


_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Mish, nn.Softplus, nn.SELU, nn.CELU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Tanhshrink, nn.Softsign,
    nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.RReLU,
)


@_module(*_ACTIVATION_MODULES)
def _activation_module(ctx):
    return passthrough(ctx, 0)


def _resize_linear(module, sizes):
    module.out_features, module.in_features = module.weight.shape


@_module(nn.Linear, resize=_resize_linear, attributes=("in_features", "out_features"))
def _linear_module(ctx):
    m = ctx.module
    return linear_like(ctx, _first(ctx), ctx.tensor(m, "weight"), ctx.tensor(m, "bias"))


def _resize_conv(module, sizes):
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    w = module.weight.shape
    old_in, old_out, groups = module.in_channels, module.out_channels, module.groups
    if transposed:
        per_group_in = old_in // groups
        if groups > 1 and per_group_in == 1:
            module.groups = w[0]
        module.in_channels = w[0]
        module.out_channels = w[1] * module.groups
    else:
        per_group_in = old_in // groups
        if groups > 1 and per_group_in == 1:
            m = old_out // groups
            module.groups = w[0] // m
            module.in_channels = module.groups
        else:
            module.in_channels = w[1] * groups
        module.out_channels = w[0]


@_module(nn.Conv1d, nn.Conv2d, nn.Conv3d, resize=_resize_conv, attributes=("in_channels", "out_channels", "groups"))
def _conv_module(ctx):
    m = ctx.module
    if m.padding_mode != "zeros":
        pass  # padding is spatial only; channels are unaffected
    return conv_like(ctx, _first(ctx), ctx.tensor(m, "weight"), ctx.tensor(m, "bias"), m.groups, False,
                     len(m.kernel_size))


@_module(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, resize=_resize_conv,
         attributes=("in_channels", "out_channels", "groups"))
def _conv_transpose_module(ctx):
    m = ctx.module
    return conv_like(ctx, _first(ctx), ctx.tensor(m, "weight"), ctx.tensor(m, "bias"), m.groups, True,
                     len(m.kernel_size))


def _resize_num_features(module, sizes):
    for name in ("weight", "running_mean"):
        t = getattr(module, name, None)
        if isinstance(t, Tensor):
            module.num_features = t.shape[0]
            return
    if sizes.input_channels is not None:
        module.num_features = sizes.input_channels


@_module(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, resize=_resize_num_features,
         attributes=("num_features",))
def _batch_norm_module(ctx):
    m = ctx.module
    infos = [ctx.tensor(m, n) for n in ("weight", "bias", "running_mean", "running_var")]
    return per_channel_norm(ctx, _first(ctx), infos)


def _resize_group_norm(module, sizes):
    per_group = module.num_channels // module.num_groups
    channels = module.weight.shape[0] if module.weight is not None else sizes.input_channels
    if channels is not None:
        module.num_channels = channels
        module.num_groups = channels // per_group


@_module(nn.GroupNorm, resize=_resize_group_norm, attributes=("num_groups", "num_channels"))
def _group_norm_module(ctx):
    m = ctx.module
    return group_norm_like(ctx, _first(ctx), m.num_groups, ctx.tensor(m, "weight"), ctx.tensor(m, "bias"))


def _resize_layer_norm(module, sizes):
    if module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


_LAYER_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@_module(*_LAYER_NORMS, resize=_resize_layer_norm, attributes=("normalized_shape",))
def _layer_norm_module(ctx):
    m = ctx.module
    return layer_norm_like(ctx, _first(ctx), len(m.normalized_shape), ctx.tensor(m, "weight"), ctx.tensor(m, "bias"))


def _resize_embedding(module, sizes):
    module.num_embeddings, module.embedding_dim = module.weight.shape


@_module(nn.Embedding, resize=_resize_embedding, attributes=("num_embeddings", "embedding_dim"))
def _embedding_module(ctx):
    return embedding_like(ctx, _first(ctx), ctx.tensor(ctx.module, "weight"))


def _resize_prelu(module, sizes):
    module.num_parameters = module.weight.shape[0]


@_module(nn.PReLU, resize=_resize_prelu, attributes=("num_parameters",))
def _prelu_module(ctx):
    m = ctx.module
    x_arg = _first(ctx)
    if m.num_parameters > 1:
        return per_channel_norm(ctx, x_arg, [ctx.tensor(m, "weight")])
    return dict(ctx.dims(x_arg))


@_module(nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d)
def _pool1d(ctx):
    return spatial(ctx, _first(ctx), 1)


@_module(nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
         nn.FractionalMaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
def _pool2d(ctx):
    return spatial(ctx, _first(ctx), 2)


@_module(nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.ConstantPad3d,
         nn.ReplicationPad3d, nn.ZeroPad3d if hasattr(nn, "ZeroPad3d") else nn.ConstantPad3d)
def _pool3d(ctx):
    return spatial(ctx, _first(ctx), 3)


@_module(nn.ConstantPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d)
def _pad1d(ctx):
    return spatial(ctx, _first(ctx), 1)


@_module(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def _upsample(ctx):
    x_arg = _first(ctx)
    return spatial(ctx, x_arg, ctx.value(x_arg).ndim - 2)


@_module(nn.Flatten)
def _flatten_module(ctx):
    return reshape_rule(ctx, _first(ctx), None, "nn.Flatten")


@_module(nn.Unflatten)
def _unflatten_module(ctx):
    m = ctx.module
    x_arg = _first(ctx)
    value = ctx.value(x_arg)
    dim = _norm_dim(m.dim, value.ndim)
    entries = [("pass",)] * dim + list(m.unflattened_size) + [("pass",)] * (value.ndim - dim - 1)
    return reshape_rule(ctx, x_arg, entries, "nn.Unflatten")


@_module(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def _softmax_module(ctx):
    x_arg = _first(ctx)
    value = ctx.value(x_arg)
    dim = ctx.module.dim
    if dim is None:
        dim = 0 if value.ndim in (0, 1, 3) else 1
    d = _norm_dim(dim, value.ndim)
    return keep_dims(ctx, ctx.dims(x_arg), [d], f"normalises over dimension {d}, which carries channels")


@_module(nn.Softmax2d)
def _softmax2d_module(ctx):
    x_arg = _first(ctx)
    d = ctx.value(x_arg).ndim - 3
    return keep_dims(ctx, ctx.dims(x_arg), [d], "normalises over the channels")


@_module(nn.PixelShuffle)
def _pixel_shuffle_module(ctx):
    return _pixel_shuffle(ctx, ctx.module.upscale_factor, False)


@_module(nn.PixelUnshuffle)
def _pixel_unshuffle_module(ctx):
    return _pixel_shuffle(ctx, ctx.module.downscale_factor, True)


@_module(nn.ChannelShuffle)
def _channel_shuffle_module(ctx):
    g = ctx.module.groups
    x_arg = _first(ctx)
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    c = 1 if value.ndim > 1 else 0
    out = dict(x)
    if c in x:
        grid = x[c].view(g, -1)  # channel i*(C/g)+j goes to j*g+i; removal keeps the grid: couple column j
        ctx.union(grid[:1].expand_as(grid), grid)
        out[c] = grid.t().reshape(-1).clone()
    return out


# MultiheadAttention: see mha.py (registered there)
from . import mha as _mha  # noqa: E402,F401

__all__ += ["broadcast", "passthrough", "reshape_rule", "linear_like", "conv_like", "UnsupportedOperationError"]
