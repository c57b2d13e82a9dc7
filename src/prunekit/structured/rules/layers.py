"""Rules of layers with parameters: linear, convolution, matmul with a weight, norms, embeddings.

Each rule says which weight dimension reads the incoming channels (``"in"``), which writes new ones
(``"out"``) and which follows them (``"through"``); each layer type has a resize function that updates
its attributes (``in_features``, ``out_channels``, ``num_features``, ...) after surgery.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._types import ParamRef
from .base import first_input, none_labels, rule_for_functions, rule_for_methods, rule_for_modules

__all__ = ["follow", "bias_follows", "linear_like", "conv_like", "per_channel_norm", "group_norm_like", "layer_norm_like", "embedding_like",
           "weight_info"]


# --------------------------------------------------------------------------------------------------
# Contractions with parameters: linear, conv, matmul
# --------------------------------------------------------------------------------------------------


def weight_info(ctx, arg):
    lab = ctx.labels(arg)
    return lab.info if isinstance(lab, ParamRef) else None


def follow(ctx, a: Tensor | None, b: Tensor | None, reason: str) -> None:
    """``a`` and ``b`` label the same indices: make them equal; one without labels pins the other."""
    if a is not None and b is not None:
        ctx.union(a, b)
    else:
        ctx.pin(a if a is not None else b, reason)


def bias_follows(ctx, b_arg, produced: Tensor | None, role: str = "out") -> None:
    """The bias of a layer whose output channels are ``produced``: a parameter follows them; a bias
    computed in forward() (``torch.cat((q_bias, k_bias, v_bias))``) is coupled to them, entry by entry, so
    the parameters it is made of shrink with the layer and never alone."""
    if b_arg is None or ctx.value(b_arg) is None:
        return
    info = weight_info(ctx, b_arg)
    if info is not None:
        ctx.consume(info, 0, produced, role)
    else:
        follow(ctx, produced, ctx.dims(b_arg).get(0), "a bias computed in forward() that does not follow the channels")


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
    else:  # a weight computed in forward(): its labels say which columns and rows follow the channels
        w_labels = w_labels or {}
        follow(ctx, x.get(d), w_labels.get(1), "linear with a weight computed in forward() whose input "
                                               "dimension does not follow the channels")
        ctx.tap(value, d, x.get(d))
        produced = w_labels.get(0)
        ctx.add_role(w_labels.get(1), "in")
        ctx.add_role(produced, "out")
    if b_info is not None and produced is not None:
        ctx.consume(b_info, 0, produced, "out")
    if produced is not None:
        out[d] = produced
    return out


@rule_for_functions(F.linear)
def _f_linear(ctx):
    w_arg, b_arg = ctx.raw(1, "weight"), ctx.raw(2, "bias")
    w_info = weight_info(ctx, w_arg)
    w_labels = None if w_info is not None else ctx.dims(w_arg)
    out = linear_like(ctx, ctx.raw(0, "input"), w_info, None, w_labels)
    bias_follows(ctx, b_arg, out.get(ctx.value(ctx.raw(0, "input")).ndim - 1))
    return out


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
            L = none_labels(in_channels)
        produced = L.repeat_interleave(m)
        ctx.consume(w_info, 0, produced, "through")
    elif transposed and per_group_in == 1:
        m = w.shape[1]
        if L is None:
            L = none_labels(in_channels)
        ctx.consume(w_info, 0, L, "through")
        produced = L.repeat_interleave(m)
    else:
        # grouped: every group keeps the same number of inputs and outputs, so position r of every
        # group goes together (on each side)
        if L is None:
            L = none_labels(in_channels)
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


def _computed_weight_conv(ctx, x_arg, w: dict, b_arg, groups: int, transposed: bool, n_spatial: int) -> dict:
    """A convolution whose weight is computed in forward() (weight standardisation, a gain): its input and
    output channels follow the computed weight's labels (a standardisation over the input channels has
    pinned them); grouped ones are pinned."""
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    c = value.ndim - n_spatial - 1
    out = {d: l for d, l in x.items() if d < c}
    for d, l in x.items():
        if d > c:
            ctx.pin(l, "convolves over this dimension (spatial), which carries channels")
    for d, l in w.items():
        if d >= 2:
            ctx.pin(l, "kernel dimension of a convolution weight computed in forward()")
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if groups != 1:
        for l in (x.get(c), w.get(0), w.get(1)):
            ctx.pin(l, "grouped convolution with a weight computed in forward()")
        return out
    follow(ctx, x.get(c), w.get(in_dim), "convolution with a weight computed in forward() whose input "
                                         "dimension does not follow the channels")
    ctx.tap(value, c, x.get(c))
    produced = w.get(out_dim)
    ctx.add_role(w.get(in_dim), "in")
    ctx.add_role(produced, "out")
    bias_follows(ctx, b_arg, produced)
    if produced is not None:
        out[c] = produced
    return out


def _f_conv(n_spatial: int, transposed: bool):
    def rule(ctx):
        w_arg, b_arg = ctx.raw(1, "weight"), ctx.raw(2, "bias")
        groups = ctx.arg(6, "groups", 1)  # conv*d and conv_transpose*d both take groups 7th
        w_info = weight_info(ctx, w_arg)
        x_arg = ctx.raw(0, "input")
        if w_info is None:
            return _computed_weight_conv(ctx, x_arg, ctx.dims(w_arg), b_arg, groups, transposed, n_spatial)
        b_info = weight_info(ctx, b_arg) if b_arg is not None else None
        out = conv_like(ctx, x_arg, w_info, b_info, groups, transposed, n_spatial)
        if b_info is None:
            bias_follows(ctx, b_arg, out.get(ctx.value(x_arg).ndim - n_spatial - 1))
        return out

    return rule


rule_for_functions(F.conv1d, torch.conv1d)(_f_conv(1, False))
rule_for_functions(F.conv2d, torch.conv2d)(_f_conv(2, False))
rule_for_functions(F.conv3d, torch.conv3d)(_f_conv(3, False))
rule_for_functions(F.conv_transpose1d)(_f_conv(1, True))
rule_for_functions(F.conv_transpose2d)(_f_conv(2, True))
rule_for_functions(F.conv_transpose3d)(_f_conv(3, True))


@rule_for_functions(torch.matmul, operator.matmul, torch.mm, torch.bmm)
@rule_for_methods("matmul", "mm", "bmm")
def _matmul(ctx):
    a_arg, b_arg = ctx.raw(0), ctx.raw(1)
    a_val, b_val = ctx.value(a_arg), ctx.value(b_arg)
    a_ref, b_ref = weight_info(ctx, a_arg), weight_info(ctx, b_arg)
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


@rule_for_functions(F.batch_norm, F.instance_norm)
def _f_batch_norm(ctx):
    name = ctx.op.target.__name__
    if name == "batch_norm":
        tensors = [ctx.raw(1, "running_mean"), ctx.raw(2, "running_var"), ctx.raw(3, "weight"), ctx.raw(4, "bias")]
    else:
        tensors = [ctx.raw(1, "running_mean"), ctx.raw(2, "running_var"), ctx.raw(3, "weight"), ctx.raw(4, "bias")]
    x_arg = ctx.raw(0, "input")
    value = ctx.value(x_arg)
    c = 1 if value.ndim > 1 else 0
    x = ctx.dims(x_arg)
    channels = x.get(c)
    batch_statistics = name == "instance_norm" or ctx.value(ctx.raw(1, "running_mean")) is None or bool(
        ctx.arg(5, "training", False))
    if batch_statistics:  # the statistics are taken over every other dimension: those cannot shrink
        for d, l in x.items():
            if d != c:
                ctx.pin(l, f"{name} computes its statistics over dimension {d}")
    infos = []
    for t in tensors:
        if t is None or ctx.value(t) is None:
            continue
        info = weight_info(ctx, t)
        if info is not None:
            infos.append(info)
        else:  # per-channel statistics or affine parameters computed in forward(): they follow the channels
            follow(ctx, channels, ctx.dims(t).get(0), "normalisation with per-channel tensors computed in "
                                                      "forward() that do not follow the channels")
    return per_channel_norm(ctx, x_arg, infos)


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


@rule_for_functions(F.group_norm)
def _f_group_norm(ctx):
    w, b = ctx.raw(2, "weight"), ctx.raw(3, "bias")
    return group_norm_like(ctx, ctx.raw(0, "input"), ctx.arg(1, "num_groups"),
                           weight_info(ctx, w) if w is not None else None,
                           weight_info(ctx, b) if b is not None else None)


def layer_norm_like(ctx, x_arg, n_norm: int, w_info, b_info) -> dict:
    value = ctx.value(x_arg)
    x = ctx.dims(x_arg)
    first = value.ndim - n_norm
    for d, l in x.items():
        if d >= first and not ctx.option("hidden"):  # hidden=True: the width shrinks, statistics change
            ctx.pin(l, "LayerNorm normalises over this dimension: removing a channel would change its mean "
                       "and variance (hidden=True prunes it anyway)")
    for info in (w_info, b_info):
        if info is not None:
            for k in range(n_norm):
                ctx.consume(info, k, x.get(first + k), "through")
    return dict(x)


@rule_for_functions(F.layer_norm, F.rms_norm)
def _f_layer_norm(ctx):
    shape = ctx.arg(1, "normalized_shape")
    n = 1 if isinstance(shape, int) else len(shape)
    w, b = ctx.raw(2, "weight"), ctx.raw(3, "bias") if ctx.op.target is F.layer_norm else None
    return layer_norm_like(ctx, ctx.raw(0, "input"), n, weight_info(ctx, w) if w is not None else None,
                           weight_info(ctx, b) if b is not None else None)


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


@rule_for_functions(F.embedding)
def _f_embedding(ctx):
    return embedding_like(ctx, ctx.raw(0, "input"), weight_info(ctx, ctx.raw(1, "weight")))


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


def _resize_linear(module, sizes):
    module.out_features, module.in_features = module.weight.shape


@rule_for_modules(nn.Linear, resize=_resize_linear, attributes=("in_features", "out_features"))
def _linear_module(ctx):
    m = ctx.module
    return linear_like(ctx, first_input(ctx), ctx.tensor(m, "weight"), ctx.tensor(m, "bias"))


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


@rule_for_modules(nn.Conv1d, nn.Conv2d, nn.Conv3d, resize=_resize_conv, attributes=("in_channels", "out_channels", "groups"))
def _conv_module(ctx):
    m = ctx.module
    if m.padding_mode != "zeros":
        pass  # padding is spatial only; channels are unaffected
    return conv_like(ctx, first_input(ctx), ctx.tensor(m, "weight"), ctx.tensor(m, "bias"), m.groups, False,
                     len(m.kernel_size))


@rule_for_modules(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, resize=_resize_conv,
         attributes=("in_channels", "out_channels", "groups"))
def _conv_transpose_module(ctx):
    m = ctx.module
    return conv_like(ctx, first_input(ctx), ctx.tensor(m, "weight"), ctx.tensor(m, "bias"), m.groups, True,
                     len(m.kernel_size))


def _resize_num_features(module, sizes):
    for name in ("weight", "running_mean"):
        t = getattr(module, name, None)
        if isinstance(t, Tensor):
            module.num_features = t.shape[0]
            return
    if sizes.input_channels is not None:
        module.num_features = sizes.input_channels


@rule_for_modules(nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm, nn.modules.instancenorm._InstanceNorm,
                  resize=_resize_num_features, attributes=("num_features",))
def _batch_norm_module(ctx):
    m = ctx.module
    infos = [ctx.tensor(m, n) for n in ("weight", "bias", "running_mean", "running_var")]
    return per_channel_norm(ctx, first_input(ctx), infos)


def _resize_group_norm(module, sizes):
    per_group = module.num_channels // module.num_groups
    channels = module.weight.shape[0] if module.weight is not None else sizes.input_channels
    if channels is not None:
        module.num_channels = channels
        module.num_groups = channels // per_group


@rule_for_modules(nn.GroupNorm, resize=_resize_group_norm, attributes=("num_groups", "num_channels"))
def _group_norm_module(ctx):
    m = ctx.module
    return group_norm_like(ctx, first_input(ctx), m.num_groups, ctx.tensor(m, "weight"), ctx.tensor(m, "bias"))


def _resize_layer_norm(module, sizes):
    if module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


_LAYER_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@rule_for_modules(*_LAYER_NORMS, resize=_resize_layer_norm, attributes=("normalized_shape",))
def _layer_norm_module(ctx):
    m = ctx.module
    return layer_norm_like(ctx, first_input(ctx), len(m.normalized_shape), ctx.tensor(m, "weight"), ctx.tensor(m, "bias"))


def _resize_embedding(module, sizes):
    module.num_embeddings, module.embedding_dim = module.weight.shape


@rule_for_modules(nn.Embedding, resize=_resize_embedding, attributes=("num_embeddings", "embedding_dim"))
def _embedding_module(ctx):
    return embedding_like(ctx, first_input(ctx), ctx.tensor(ctx.module, "weight"))


def _resize_prelu(module, sizes):
    module.num_parameters = module.weight.shape[0]


@rule_for_modules(nn.PReLU, resize=_resize_prelu, attributes=("num_parameters",))
def _prelu_module(ctx):
    m = ctx.module
    x_arg = first_input(ctx)
    if m.num_parameters > 1:
        return per_channel_norm(ctx, x_arg, [ctx.tensor(m, "weight")])
    return dict(ctx.dims(x_arg))
