"""Rules of attention: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` (heads, widths).

``nn.MultiheadAttention`` ties its inner width to its embedding width (``embed_dim = num_heads *
head_dim``), so surgery turns a layer that lost heads into :class:`~prunekit.structured.mha.
PrunedMultiheadAttention`, whose inner, input and output widths are independent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mha import PrunedMultiheadAttention
from .base import rule_for_functions, rule_for_modules
from .elementwise import broadcast

__all__: list[str] = []


@rule_for_functions(F.scaled_dot_product_attention)
def _sdpa(ctx):
    q_arg, k_arg, v_arg = ctx.raw(0, "query"), ctx.raw(1, "key"), ctx.raw(2, "value")
    q, k, v = ctx.dims(q_arg), ctx.dims(k_arg), ctx.dims(v_arg)
    nq, nk, nv = (ctx.value(a).ndim for a in (q_arg, k_arg, v_arg))
    for lab, d, why in ((q, nq - 1, "query features"), (k, nk - 1, "key features"), (k, nk - 2, "keys"),
                        (v, nv - 2, "values' sequence")):
        if d in lab:
            ctx.pin(lab[d], f"attention contracts over the {why}")
    mask = ctx.raw(3, "attn_mask")
    if ctx.is_ref(mask):
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


def _heads(ctx, module) -> Tensor:
    """One atom per head of ``module``, the same on every call (a layer may be called twice)."""
    return ctx.atoms_for(module, module.num_heads)


def _resize_mha(module: nn.MultiheadAttention, sizes) -> None:
    if module._qkv_same_embed_dim:
        inner = module.in_proj_weight.shape[0] // 3
        module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
    else:
        inner = module.q_proj_weight.shape[0]
        module.embed_dim = module.q_proj_weight.shape[1]
        module.kdim = module.k_proj_weight.shape[1]
        module.vdim = module.v_proj_weight.shape[1]
    module.num_heads = inner // module.head_dim
    module.out_proj.in_features = module.out_proj.weight.shape[1]
    module.out_proj.out_features = module.out_proj.weight.shape[0]
    if not isinstance(module, PrunedMultiheadAttention):
        cls = type(module)
        if cls is nn.MultiheadAttention:
            module.__class__ = PrunedMultiheadAttention
        else:  # a parametrized (masked) MultiheadAttention: keep its properties on a new subclass
            namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, (PrunedMultiheadAttention,), namespace)


@rule_for_modules(nn.MultiheadAttention, PrunedMultiheadAttention, resize=_resize_mha,
                  attributes=("embed_dim", "kdim", "vdim", "num_heads"))
def _mha_rule(ctx):
    m = ctx.module
    q_arg, k_arg, v_arg = ctx.raw(0, "query"), ctx.raw(1, "key"), ctx.raw(2, "value")
    q_val = ctx.value(q_arg)
    d = q_val.ndim - 1
    q, k, v = ctx.dims(q_arg), ctx.dims(k_arg), ctx.dims(v_arg)
    heads = _heads(ctx, m)
    per_head = heads.repeat_interleave(m.head_dim)
    # masks that name heads or carry channels
    attn_mask = ctx.raw(5, "attn_mask")
    mask_val = ctx.value(attn_mask)
    if isinstance(mask_val, Tensor) and mask_val.dim() == 3:
        ctx.pin(heads, "MultiheadAttention with a per-head (3-D) attn_mask")
    for mask in (attn_mask, ctx.raw(3, "key_padding_mask")):
        if ctx.is_ref(mask):
            for l in ctx.dims(mask).values():
                ctx.pin(l, "attention mask")
    if m._qkv_same_embed_dim:
        w = ctx.tensor(m, "in_proj_weight")
        ctx.consume(w, 0, torch.cat([per_head] * 3), "out")
        for lab in (q, k, v):
            ctx.consume(w, 1, lab.get(d), "in")
        ctx.tap(q_val, d, q.get(d))
    else:
        for name, lab, arg in (("q_proj_weight", q, q_arg), ("k_proj_weight", k, k_arg), ("v_proj_weight", v, v_arg)):
            info = ctx.tensor(m, name)
            ctx.consume(info, 0, per_head, "out")
            ctx.consume(info, 1, lab.get(d), "in")
    b = ctx.tensor(m, "in_proj_bias")
    if b is not None:
        ctx.consume(b, 0, torch.cat([per_head] * 3), "out")
    for name in ("bias_k", "bias_v"):
        info = ctx.tensor(m, name)
        if info is not None:
            ctx.consume(info, 2, per_head, "out")
    w_out = ctx.tensor(m.out_proj, "weight")
    ctx.consume(w_out, 1, per_head, "in")
    out_labels = ctx.param(w_out, 0, "out")
    b_out = ctx.tensor(m.out_proj, "bias")
    if b_out is not None:
        ctx.consume(b_out, 0, out_labels, "out")
    # attention mixes positions of keys and values: their sequence and batch dims cannot shrink
    for lab in (k, v):
        for dim, l in lab.items():
            if dim != d:
                ctx.pin(l, "attention mixes the keys and values along this dimension")
    out = {dim: l for dim, l in q.items() if dim != d}
    out[d] = out_labels
    weights = None
    if isinstance(ctx.output, (tuple, list)) and ctx.output[1] is not None:
        weights = {}
        used = ctx.output_used(1)
        average = ctx.value(ctx.raw(6, "average_attn_weights", True))
        if used:
            if average:
                ctx.pin(heads, "the head-averaged attention weights are used (their mean depends on every head)")
            else:
                weights = {ctx.output[1].ndim - 3: heads}
    return [out, weights]
