"""Rules of shape ops: views and reshapes (sizes that follow a removal), permutes, cat, split, index.

A reshape keeps channels only when the new shape follows their removal: a size computed from the
tensor (``x.size(1) // g``) or ``-1``; the size expression is re-evaluated with fewer channels to check.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import first_input, none_labels, norm_dim, rule_for_functions, rule_for_methods, rule_for_modules
from .elementwise import broadcast, keep_dims

__all__ = ["reshape_rule"]


# --------------------------------------------------------------------------------------------------
# Shape operations
# --------------------------------------------------------------------------------------------------


@rule_for_functions(torch.permute)
@rule_for_methods("permute")
def _permute(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    order = ctx.value(list(ctx.op.args[1:])) if len(ctx.op.args) > 1 else ctx.value(ctx.op.kwargs["dims"])
    if len(order) == 1 and isinstance(order[0], (list, tuple)):
        order = order[0]
    order = [norm_dim(d, nd) for d in order]
    x = ctx.dims(x_arg)
    return {order.index(d): l for d, l in x.items()}


@rule_for_functions(torch.transpose, torch.swapaxes, torch.swapdims)
@rule_for_methods("transpose", "swapaxes", "swapdims", "transpose_")
def _transpose(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    a, b = norm_dim(ctx.arg(1, "dim0"), nd), norm_dim(ctx.arg(2, "dim1"), nd)
    return {({a: b, b: a}.get(d, d)): l for d, l in ctx.dims(x_arg).items()}


@rule_for_functions(torch.t)
@rule_for_methods("t")
def _t(ctx):
    x_arg = ctx.raw(0)
    if ctx.value(x_arg).ndim < 2:
        return dict(ctx.dims(x_arg))
    return {1 - d: l for d, l in ctx.dims(x_arg).items()}


@rule_for_functions(torch.movedim, torch.moveaxis)
@rule_for_methods("movedim", "moveaxis")
def _movedim(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [norm_dim(s, nd) for s in src]
    dst = [norm_dim(s, nd) for s in dst]
    order = [None] * nd
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(d for d in range(nd) if d not in src)
    order = [o if o is not None else next(rest) for o in order]
    return {order.index(d): l for d, l in ctx.dims(x_arg).items()}


@rule_for_functions(torch.unsqueeze)
@rule_for_methods("unsqueeze", "unsqueeze_")
def _unsqueeze(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    dim = ctx.arg(1, "dim")
    dim = dim % (nd + 1)
    return {(d + 1 if d >= dim else d): l for d, l in ctx.dims(x_arg).items()}


@rule_for_functions(torch.squeeze)
@rule_for_methods("squeeze", "squeeze_")
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
        dims = [norm_dim(d, value.ndim) for d in dims if value.shape[norm_dim(d, value.ndim)] == 1]
    return {d - sum(1 for s in dims if s < d): l for d, l in x.items() if d not in dims}


@rule_for_functions(torch.flip)
@rule_for_methods("flip")
def _flip(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    dims = ctx.arg(1, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = {norm_dim(d, nd) for d in dims}
    return {d: (l.flip(0) if d in dims else l) for d, l in ctx.dims(x_arg).items()}


@rule_for_functions(torch.roll)
@rule_for_methods("roll")
def _roll(ctx):
    x_arg = ctx.raw(0)
    nd = ctx.value(x_arg).ndim
    dims = ctx.arg(2, "dims")
    x = ctx.dims(x_arg)
    dims = range(nd) if dims is None else ([dims] if isinstance(dims, int) else dims)
    return keep_dims(ctx, x, [norm_dim(d, nd) for d in dims], "rolls a channel dimension by a fixed shift")


@rule_for_methods("repeat")
def _repeat(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    reps = ctx.value(list(ctx.op.args[1:]))
    if len(reps) == 1 and isinstance(reps[0], (list, tuple, torch.Size)):
        reps = list(reps[0])
    lead = len(reps) - value.ndim
    return {d + lead: l.repeat(int(reps[d + lead])) for d, l in ctx.dims(x_arg).items()}


@rule_for_methods("expand", "expand_as", "broadcast_to")
@rule_for_functions(torch.broadcast_to)
def _expand(ctx):
    operands = [ctx.raw(0)]
    if ctx.op.target == "expand_as":
        operands.append(ctx.raw(1))
    x = broadcast(ctx, operands, ctx.output.shape)
    value = ctx.value(ctx.raw(0))
    lead = ctx.output.ndim - value.ndim
    if ctx.op.target in ("expand", "broadcast_to") or ctx.op.target is torch.broadcast_to:
        sizes = list(ctx.op.args[1:]) if ctx.op.target == "expand" else [ctx.raw(1, "size")]
        if len(sizes) == 1 and isinstance(ctx.value(sizes[0]), (list, tuple, torch.Size)):
            sizes = sizes[0] if isinstance(sizes[0], (list, tuple)) else [None] * ctx.output.ndim
        for d, l in list(x.items()):
            arg = sizes[d] if d < len(sizes) else None
            if d - lead >= 0 and value.shape[d - lead] > 1 and not (arg == -1 or _tainted(ctx, arg)):
                ctx.pin(l, "expands to a size written in forward()")
    return x


def _tainted(ctx, arg) -> bool:
    """Whether a size argument was computed from a channel dimension (so it can follow a removal)."""
    return bool(ctx.size_sources(arg))


def _size_entries(ctx, raw_sizes: list) -> list:
    """Normalise the shape arguments of view/reshape into one entry per output dim."""
    if len(raw_sizes) == 1:
        single = raw_sizes[0]
        value = ctx.value(single)
        if isinstance(value, (list, tuple, torch.Size)):
            if ctx.is_ref(single):
                return [("elem", single, i) for i in range(len(value))]
            return list(single)
    return list(raw_sizes)


def _entry_elastic(ctx, entry) -> bool:
    if isinstance(entry, tuple) and len(entry) == 3 and entry[0] == "elem":
        return bool(ctx.size_sources(entry[1], element=entry[2]))
    if isinstance(entry, tuple) and entry and entry[0] == "pass":
        return True
    if isinstance(entry, int):
        return entry == -1
    return _tainted(ctx, entry)


def _entry_value(ctx, entry, subst) -> Any:
    if isinstance(entry, tuple) and len(entry) == 3 and entry[0] == "elem":
        return ctx.reevaluate(entry[1], subst)[entry[2]]
    return ctx.reevaluate(entry, subst)


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
        taints |= set(ctx.size_sources(node))
    for source, dim in taints:  # the channel count read from another tensor: both must keep the same count,
        lab = ctx.labels(source)  # so couple them (one channel each, position by position)
        if isinstance(lab, dict) and dim in lab and lab[dim].numel() == labels.numel():
            ctx.union(lab[dim], labels, "a reshape takes this channel count from another tensor")
    roots = ctx.roots()  # a size read elsewhere on the stream carries other atoms of the same channels
    for source, dim in taints:
        lab = ctx.labels(source)
        if not isinstance(lab, dict) or dim not in lab:
            return False
        subst[(source, dim)] = int((~torch.isin(roots[lab[dim]], roots[unit])).sum())
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


@rule_for_methods("view", "reshape")
@rule_for_functions(torch.reshape)
def _view(ctx):
    x_arg = ctx.raw(0)
    if ctx.op.kind == "function":
        sizes = [ctx.raw(1, "shape")]
    else:
        sizes = list(ctx.op.args[1:]) or [ctx.op.kwargs.get("shape", ctx.op.kwargs.get("size"))]
    if len(sizes) == 1 and isinstance(ctx.value(sizes[0]), torch.dtype):
        return ctx.unknown()
    return reshape_rule(ctx, x_arg, _size_entries(ctx, sizes), f".{ctx.op.target}()" if isinstance(ctx.op.target, str) else "reshape")


@rule_for_methods("view_as", "reshape_as")
def _view_as(ctx):
    other = ctx.raw(1)
    nd = ctx.value(other).ndim
    other_lab = ctx.dims(other)
    x = reshape_rule(ctx, ctx.raw(0), [("pass",) if d in other_lab else ctx.value(other).shape[d] for d in range(nd)],
                     f".{ctx.op.target}()")
    for d, l in list(x.items()):
        if d in other_lab:
            ctx.union(l, other_lab[d])
    return x


@rule_for_functions(torch.flatten)
@rule_for_methods("flatten")
def _flatten(ctx):
    return reshape_rule(ctx, ctx.raw(0), None, "flatten")


@rule_for_methods("unflatten")
@rule_for_functions(torch.unflatten)
def _unflatten(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    dim = norm_dim(ctx.arg(1, "dim"), value.ndim)
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


@rule_for_functions(F.pixel_shuffle, torch.pixel_shuffle)
def _f_pixel_shuffle(ctx):
    return _pixel_shuffle(ctx, ctx.arg(1, "upscale_factor"), False)


@rule_for_functions(F.pixel_unshuffle, torch.pixel_unshuffle)
def _f_pixel_unshuffle(ctx):
    return _pixel_shuffle(ctx, ctx.arg(1, "downscale_factor"), True)


@rule_for_functions(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx):
    tensors = ctx.raw(0, "tensors")
    values = ctx.value(tensors)
    ndim = ctx.output.ndim
    dim = norm_dim(ctx.arg(1, "dim", 0), ndim)
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
            parts.append(none_labels(v.shape[dim]))
    if any_labels:
        out[dim] = torch.cat(parts)
    return out


@rule_for_functions(torch.stack)
def _stack(ctx):
    tensors = ctx.raw(0, "tensors")
    ndim = ctx.output.ndim
    dim = norm_dim(ctx.arg(1, "dim", 0), ndim)
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
        for source, sd in ctx.size_sources(size_arg):
            lab = ctx.labels(source)
            if not isinstance(lab, dict) or sd not in lab:
                subst = None
                break
            subst[(source, sd)] = int((~torch.isin(lab[sd], unit)).sum())
        try:
            follows = subst is not None and int(ctx.reevaluate(size_arg, subst)) == sizes[0] - 1
        except Exception:
            follows = False
        if not follows:
            ctx.pin(labels, f"{what}: the split size does not follow a removal of channels")
    for i in range(len(outputs)):
        result[i][dim] = blocks[i].clone()
    return result


@rule_for_functions(torch.chunk)
@rule_for_methods("chunk")
def _chunk(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    chunks = ctx.arg(1, "chunks")
    dim = norm_dim(ctx.arg(2, "dim", 0), value.ndim)
    x = ctx.dims(x_arg)
    if dim in x and value.shape[dim] % chunks:
        ctx.pin(x[dim], f"chunk({chunks}) of {value.shape[dim]} channels is uneven")
    return _chunks_equal(ctx, x_arg, dim, chunks, f"chunk({chunks})")


@rule_for_functions(torch.split)
@rule_for_methods("split")
def _split(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    size_raw = ctx.raw(1, "split_size_or_sections", ctx.raw(1, "split_size"))
    dim = norm_dim(ctx.arg(2, "dim", 0), value.ndim)
    x = ctx.dims(x_arg)
    if dim in x:
        if ctx.is_ref(size_raw) and isinstance(ctx.value(size_raw), int) and _tainted(ctx, size_raw):
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


@rule_for_functions(torch.unbind)
@rule_for_methods("unbind")
def _unbind(ctx):
    x_arg = ctx.raw(0)
    value = ctx.value(x_arg)
    dim = norm_dim(ctx.arg(1, "dim", 0), value.ndim)
    x = ctx.dims(x_arg)
    if dim in x:
        ctx.pin(x[dim], "unbind over a channel dimension")
    out = {(d - 1 if d > dim else d): l for d, l in x.items() if d != dim}
    return [dict(out) for _ in ctx.output]


@rule_for_functions(operator.getitem)
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
# Modules
# --------------------------------------------------------------------------------------------------


@rule_for_modules(nn.Flatten)
def _flatten_module(ctx):
    return reshape_rule(ctx, first_input(ctx), None, "nn.Flatten")


@rule_for_modules(nn.Unflatten)
def _unflatten_module(ctx):
    m = ctx.module
    x_arg = first_input(ctx)
    value = ctx.value(x_arg)
    dim = norm_dim(m.dim, value.ndim)
    entries = [("pass",)] * dim + list(m.unflattened_size) + [("pass",)] * (value.ndim - dim - 1)
    return reshape_rule(ctx, x_arg, entries, "nn.Unflatten")


@rule_for_modules(nn.PixelShuffle)
def _pixel_shuffle_module(ctx):
    return _pixel_shuffle(ctx, ctx.module.upscale_factor, False)


@rule_for_modules(nn.PixelUnshuffle)
def _pixel_unshuffle_module(ctx):
    return _pixel_shuffle(ctx, ctx.module.downscale_factor, True)


@rule_for_modules(nn.ChannelShuffle)
def _channel_shuffle_module(ctx):
    g = ctx.module.groups
    x_arg = first_input(ctx)
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    c = 1 if value.ndim > 1 else 0
    out = dict(x)
    if c in x:
        grid = x[c].view(g, -1)  # channel i*(C/g)+j goes to j*g+i; removal keeps the grid: couple column j
        ctx.union(grid[:1].expand_as(grid), grid)
        out[c] = grid.t().reshape(-1).clone()
    return out
