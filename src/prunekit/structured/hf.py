"""Hugging Face transformers layers for structured pruning: their rules, and configs that follow surgery.

* GPT-2's ``Conv1D`` (a Linear whose weight is stored ``(in, out)``).
* Self-attention, kept whole and pruned by heads: the layouts of :mod:`prunekit.llm.heads` (Llama-style
  ``q_proj/k_proj/v_proj/o_proj`` with grouped-query attention, OPT's ``out_proj``, GPT-2's fused
  ``c_attn``/``c_proj``, BERT/ViT/Swin's ``query/key/value``). One channel is one key/value head with
  its query heads (one head without GQA): its rows of q, k and v (and their biases), its columns of the
  output projection (inside the module for Llama, OPT and GPT-2; the next Linear for BERT-style
  attentions, whose output carries the heads) and its column of a relative-position bias table (Swin).
  After surgery the head counts are set by :func:`prunekit.llm.heads.set_head_counts`.
* RMSNorm modules (``LlamaRMSNorm``, ...), kept whole with the LayerNorm rule, so the hidden width can
  be pruned when asked for.

The rules are registered for a model's own classes when a graph is built (``prepare``), so importing
this module never imports ``transformers``. Configs and reloading: ``hf_io.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..llm.heads import Attention, set_head_counts
from ..modules import is_gpt_conv1d
from .rules import module_rule, register_rule
from .rules.layers import layer_norm_like

__all__ = ["prepare", "attention_layout", "is_transformers_model", "weight_out"]


def is_transformers_model(model: nn.Module) -> bool:
    """Whether any module of ``model`` comes from the ``transformers`` package."""
    return any(type(m).__module__.startswith("transformers.") for m in model.modules())


# --------------------------------------------------------------------------------------------------
# Conv1D
# --------------------------------------------------------------------------------------------------


def _conv1d_rule(ctx):
    x_arg = ctx.raw(0)
    value, x = ctx.value(x_arg), ctx.dims(x_arg)
    d = value.ndim - 1
    w = ctx.tensor(ctx.module, "weight")
    ctx.consume(w, 0, x.get(d), "in")
    ctx.tap(value, d, x.get(d))
    produced = ctx.param(w, 1, "out")
    ctx.consume(ctx.tensor(ctx.module, "bias"), 0, produced, "out")
    return {k: l for k, l in x.items() if k != d} | {d: produced}


def _resize_conv1d(module, sizes):
    module.nx, module.nf = module.weight.shape


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def attention_layout(module: nn.Module) -> Attention | None:
    """``module`` seen as a self-attention with a known layout, or None (its heads are then not pruned)."""
    has = lambda *names: all(isinstance(getattr(module, n, None), nn.Module) for n in names)  # noqa: E731
    if has("q_proj", "k_proj", "v_proj") and isinstance(getattr(module, "head_dim", None), int):
        if has("o_proj"):
            return Attention(0, "", module, "llama", module.q_proj, module.k_proj, module.v_proj, module.o_proj,
                             module.head_dim)
        if has("out_proj"):
            return Attention(0, "", module, "opt", module.q_proj, module.k_proj, module.v_proj, module.out_proj,
                             module.head_dim)
    if has("c_attn", "c_proj") and is_gpt_conv1d(module.c_attn) and isinstance(getattr(module, "head_dim", None), int):
        if not getattr(module, "is_cross_attention", False):
            return Attention(0, "", module, "gpt2", None, None, None, module.c_proj, module.head_dim)
    if has("query", "key", "value") and isinstance(getattr(module, "attention_head_size", None), int):
        if all(isinstance(getattr(module, n), nn.Linear) for n in ("query", "key", "value")):
            return Attention(0, "", module, "bert", module.query, module.key, module.value, None,
                             module.attention_head_size)
    return None


def weight_out(module: nn.Module) -> int:
    """Output features of a Linear or a Conv1D."""
    return module.weight.shape[1] if is_gpt_conv1d(module) else module.weight.shape[0]


def _attention_rule(ctx):
    attn = attention_layout(ctx.module)
    x_arg = ctx.raw(0, "hidden_states")
    value, x = ctx.value(x_arg), ctx.dims(x_arg)
    d = value.ndim - 1
    others = [a for a in list(ctx.op.args) + list(ctx.op.kwargs.values()) if a is not x_arg]
    while others:  # rotary tables, masks: never channels of this attention
        other = others.pop()
        if isinstance(other, (list, tuple)):
            others += list(other)
        else:
            for labels in ctx.dims(other).values():
                ctx.pin(labels, "reaches a self-attention other than through its hidden states")
    hd = attn.head_dim
    if attn.style == "gpt2":
        heads = kv_heads = weight_out(attn.qkv) // (3 * hd)
    else:
        heads, kv_heads = weight_out(attn.q) // hd, weight_out(attn.k) // hd
    units = ctx.new(kv_heads)  # one channel = one key/value head and its query heads
    q_heads = units.repeat_interleave(heads // kv_heads)
    q_lab, kv_lab = q_heads.repeat_interleave(hd), units.repeat_interleave(hd)
    m = ctx.module
    if attn.style == "gpt2":
        w = ctx.tensor(attn.qkv, "weight")
        ctx.consume(w, 0, x.get(d), "in")
        ctx.consume(w, 1, torch.cat([q_lab, kv_lab, kv_lab]), "out")
        ctx.consume(ctx.tensor(attn.qkv, "bias"), 0, torch.cat([q_lab, kv_lab, kv_lab]), "out")
    else:
        for proj, lab in ((attn.q, q_lab), (attn.k, kv_lab), (attn.v, kv_lab)):
            ctx.consume(ctx.tensor(proj, "weight"), 1, x.get(d), "in")
            ctx.consume(ctx.tensor(proj, "weight"), 0, lab, "out")
            ctx.consume(ctx.tensor(proj, "bias"), 0, lab, "out")
    ctx.tap(value, d, x.get(d))
    for sub in m.modules():  # Swin: a relative-position bias table with one column per head
        table = ctx.tensor(sub, "relative_position_bias_table")
        if table is not None and table.tensor.ndim == 2 and table.tensor.shape[1] == heads:
            ctx.consume(table, 1, q_heads, "through")
    if attn.o is None:  # BERT-style: the output projection is the next Linear; the output carries heads
        produced = q_lab
    else:
        w = ctx.tensor(attn.o, "weight")
        conv1d = is_gpt_conv1d(attn.o)
        ctx.consume(w, 0 if conv1d else 1, q_lab, "in")
        produced = ctx.param(w, 1 if conv1d else 0, "out")
        ctx.consume(ctx.tensor(attn.o, "bias"), 0, produced, "out")
    main = {k: l for k, l in x.items() if k != d} | {d: produced}
    out = ctx.output
    if isinstance(out, Tensor):
        return main
    labels = []
    for i, o in enumerate(out):
        if i == 0:
            labels.append(main)
        elif isinstance(o, Tensor) and o.ndim == 4 and o.shape[1] == heads:
            labels.append({1: q_heads})  # attention weights, one map per query head
        else:
            labels.append({} if isinstance(o, Tensor) else None)
    return labels


def _resize_attention(module, sizes):
    attn = attention_layout(module)
    hd = attn.head_dim
    if attn.style == "gpt2":
        heads = kv = weight_out(attn.qkv) // (3 * hd)
    else:
        heads, kv = weight_out(attn.q) // hd, weight_out(attn.k) // hd
    set_head_counts(attn, heads, kv)


# recorded by pk.save / config.prunekit_structure: a config with a pruned hidden size derives others
_HEAD_ATTRIBUTES = {"gpt2": ("num_heads", "split_size", "head_dim"), "llama": ("num_key_value_groups", "head_dim"),
                    "opt": ("num_heads", "head_dim"),
                    "bert": ("num_attention_heads", "all_head_size", "attention_head_size")}


# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------


def _is_rms_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(w, Tensor) and w.ndim == 1
            and len(module._parameters) == 1 and not list(module.children()))


def _rms_norm_rule(ctx):
    return layer_norm_like(ctx, ctx.raw(0), 1, ctx.tensor(ctx.module, "weight"), None)


def prepare(model: nn.Module) -> None:
    """Register the rules of ``model``'s transformers layers (Conv1D, attentions, RMSNorms) by class."""
    for module in model.modules():
        cls = type(module)
        if not cls.__module__.startswith("transformers.") or cls in _PREPARED:
            continue
        _PREPARED.add(cls)
        if is_gpt_conv1d(module):
            register_rule(cls, _conv1d_rule, _resize_conv1d, ("nf", "nx"))
        elif _is_rms_norm(module):
            register_rule(cls, _rms_norm_rule)
        else:
            attn = attention_layout(module)
            if attn is not None and module_rule(module) is None:
                register_rule(cls, _attention_rule, _resize_attention, _HEAD_ATTRIBUTES[attn.style])


_PREPARED: set[type] = set()
