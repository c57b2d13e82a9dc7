"""Attention heads: importance, masking, and physical removal (grouped-query attention included).

* :func:`head_importance`: per block, one score per query head. ``"gradient"`` is Michel, Levy & Neubig
  (2019): a gate ``xi_h = 1`` multiplies head ``h``'s output and the importance is the expected
  ``|dL/d xi_h|`` over calibration batches (normalised per layer by its L2 norm, as in the paper);
  ``"magnitude"`` is the L2 norm of the head's weights (its query rows and output-projection columns,
  plus its share of the key/value rows it reads).
* :func:`mask_heads`: a context manager that gates heads without changing any weight (the "masked
  equivalent" of a removal).
* :func:`remove_heads`: physical removal, per block, in the q/k/v/o projections (GPT-2's fused
  ``c_attn`` too), with the attention module's attributes updated so the forward pass works as before.
  With grouped-query attention (``num_key_value_heads < num_attention_heads``), every remaining key/value
  head must keep the same number of query heads; a key/value head whose query heads are all removed is
  removed with them.
* :func:`prune_heads`: importance + selection + removal in one call.

Reloading: after a removal the config records the heads of every block in ``config.prunekit_attention``.
For Llama-style models (Llama, Mistral, Qwen2) whose blocks all keep the same number of heads, the
config's ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` are updated too, where the
config's own validation accepts them (Llama's requires ``hidden_size % num_attention_heads == 0``), so
``from_pretrained`` reloads the saved model as usual. Otherwise (different counts per block, or OPT, GPT-2
and BERT, whose head size is derived as ``hidden_size / num_heads``) ``transformers`` cannot express the
shapes: reload with :func:`prunekit.llm.load_pretrained`, which rebuilds the shapes from
``prunekit_attention`` and then loads the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..modules import eval_mode, is_gpt_conv1d
from ..registry import unknown_name_message
from .blocks import find_blocks
from .sequential import as_batches

__all__ = [
    "Attention",
    "find_attention",
    "attention_layers",
    "mask_heads",
    "head_importance",
    "remove_heads",
    "prune_heads",
    "HEAD_IMPORTANCE",
    "set_head_counts",
]

HEAD_IMPORTANCE = ("gradient", "magnitude")


@dataclass(eq=False)
class Attention:
    """The self-attention of one block, seen through its projections."""

    block: int
    name: str
    module: nn.Module  # holds the head attributes (LlamaAttention, OPTAttention, GPT2Attention, BertSelfAttention)
    style: str  # "llama", "opt", "gpt2" or "bert"
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module
    head_dim: int

    @property
    def qkv(self) -> nn.Module | None:
        return self.module.c_attn if self.style == "gpt2" else None

    @property
    def num_heads(self) -> int:
        if self.style == "gpt2":
            return self.module.c_attn.nf // (3 * self.head_dim)
        return self.q.out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        if self.style == "gpt2":
            return self.num_heads
        return self.k.out_features // self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def find_attention(block: nn.Module, index: int = 0, prefix: str = "") -> Attention:
    """The self-attention inside one block, or ``ValueError`` when its layout is unknown."""
    for name, m in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj")) and (hasattr(m, "o_proj") or hasattr(m, "out_proj")):
            style = "llama" if hasattr(m, "o_proj") else "opt"
            o = m.o_proj if style == "llama" else m.out_proj
            return Attention(index, full, m, style, m.q_proj, m.k_proj, m.v_proj, o, int(m.head_dim))
        if hasattr(m, "c_attn") and hasattr(m, "c_proj") and hasattr(m, "head_dim") and is_gpt_conv1d(m.c_attn):
            if getattr(m, "is_cross_attention", False):
                continue
            return Attention(index, full, m, "gpt2", None, None, None, m.c_proj, int(m.head_dim))
        sub = getattr(m, "self", None)
        if isinstance(sub, nn.Module) and all(hasattr(sub, a) for a in ("query", "key", "value")) and hasattr(m, "output"):
            return Attention(index, f"{full}.self", sub, "bert", sub.query, sub.key, sub.value, m.output.dense,
                             int(sub.attention_head_size))
    raise ValueError(
        f"block {index} ({type(block).__name__}): no self-attention with a known layout (q_proj/k_proj/v_proj/o_proj, "
        "OPT's out_proj, GPT-2's c_attn/c_proj, or BERT's self.query/key/value + output.dense)"
    )


def attention_layers(model: nn.Module, blocks: str | None = None) -> list[Attention]:
    """The self-attention of every block, in order."""
    name, block_list = find_blocks(model, blocks)
    return [find_attention(b, i, f"{name}.{i}") for i, b in enumerate(block_list)]


# --- gating heads ----------------------------------------------------------------------------------


@contextlib.contextmanager
def mask_heads(model: nn.Module, gates: Sequence[Tensor], blocks: str | None = None) -> Iterator[list[Attention]]:
    """Multiply each head's output by ``gates[block][head]`` (0 silences it) while the context is open.

    The gate acts on the output projection's input, which holds the heads' outputs side by side.
    """
    attns = attention_layers(model, blocks)
    if len(gates) != len(attns):
        raise ValueError(f"gates has {len(gates)} entries, the model has {len(attns)} blocks")
    handles = []
    for attn, gate in zip(attns, gates):
        if gate.numel() != attn.num_heads:
            raise ValueError(f"block {attn.block}: {gate.numel()} gates for {attn.num_heads} heads")
        handles.append(attn.o.register_forward_pre_hook(_gate_hook(gate, attn.head_dim)))
    try:
        yield attns
    finally:
        for handle in handles:
            handle.remove()


def _gate_hook(gate: Tensor, head_dim: int):
    def hook(module, args):
        x = args[0]
        g = gate.to(device=x.device, dtype=x.dtype).repeat_interleave(head_dim)
        return (x * g,) + tuple(args[1:])

    return hook


# --- importance --------------------------------------------------------------------------------------


def _default_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    out = model(**batch, labels=batch["input_ids"])
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            f"{type(model).__name__} returns no loss for labels=input_ids; pass loss_fn=(model, batch) -> loss, "
            "or use method='magnitude'"
        )
    return loss


def _magnitude_importance(attn: Attention) -> Tensor:
    h, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def rows(w: Tensor, n: int) -> Tensor:  # (n * d, in) -> per-head sum of squares
        return w.detach().float().reshape(n, d, -1).square().sum(dim=(1, 2))

    if attn.style == "gpt2":
        w = attn.qkv.weight.detach().float().t()  # (3E, in)
        q, k, v = w.split(h * d, dim=0)
        q_sq, k_sq, v_sq = rows(q, h), rows(k, h), rows(v, h)
        o_sq = attn.o.weight.detach().float().reshape(h, d, -1).square().sum(dim=(1, 2))  # Conv1D: (in, out)
    else:
        q_sq, k_sq, v_sq = rows(attn.q.weight, h), rows(attn.k.weight, kv), rows(attn.v.weight, kv)
        o_sq = attn.o.weight.detach().float().t().reshape(h, d, -1).square().sum(dim=(1, 2))
    g = h // kv
    shared = (k_sq + v_sq).repeat_interleave(g) / g
    return (q_sq + o_sq + shared).sqrt()


def head_importance(
    model: nn.Module,
    calibration: Any = None,
    method: str = "gradient",
    *,
    loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor] | None = None,
    normalize: bool = True,
    batch_size: int = 8,
    blocks: str | None = None,
) -> list[Tensor]:
    """One importance score per query head, for every block (a list of 1-D tensors; higher = keep).

    ``"gradient"`` (Michel et al. 2019) needs ``calibration`` (token ids or batches, as for
    :func:`prunekit.llm.prune`) and a loss: the model's own language-modelling loss with
    ``labels=input_ids`` unless ``loss_fn(model, batch)`` is given. ``normalize`` divides each block's
    scores by their L2 norm (the paper's layer-wise normalisation).
    """
    if method not in HEAD_IMPORTANCE:
        raise ValueError(unknown_name_message("head importance", method, HEAD_IMPORTANCE))
    attns = attention_layers(model, blocks)
    if method == "magnitude":
        scores = [_magnitude_importance(a) for a in attns]
    else:
        if calibration is None:
            raise ValueError("head importance 'gradient' needs calibration data (token ids)")
        batches = as_batches(calibration, batch_size)
        loss_fn = loss_fn or _default_loss
        device = next(model.parameters()).device
        gates = [torch.ones(a.num_heads, device=device, requires_grad=True) for a in attns]
        totals = [torch.zeros(a.num_heads, dtype=torch.float64) for a in attns]
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            with eval_mode(model), torch.enable_grad(), mask_heads(model, gates, blocks):
                for batch in batches:
                    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                    grads = torch.autograd.grad(loss_fn(model, batch), gates, allow_unused=True)
                    for total, grad in zip(totals, grads):
                        if grad is not None:
                            total += grad.detach().abs().double().cpu()
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        scores = [(t / len(batches)).float() for t in totals]
    if normalize:
        scores = [s / s.norm().clamp_min(1e-12) for s in scores]
    return scores


# --- physical removal ------------------------------------------------------------------------------------


def _index(heads: Sequence[int], d: int, device) -> Tensor:
    h = torch.as_tensor(list(heads), dtype=torch.long, device=device)
    return (h.reshape(-1, 1) * d + torch.arange(d, device=device)).reshape(-1)


def take_channels(module: nn.Module, index: Tensor, output: bool) -> None:
    """Keep the given output units (``output=True``) or input units of a Linear or Conv1D, in place."""
    conv1d = is_gpt_conv1d(module)
    w = module.weight
    dim = (1 if conv1d else 0) if output else (0 if conv1d else 1)
    module.weight = nn.Parameter(w.detach().index_select(dim, index.to(w.device)).clone(), requires_grad=w.requires_grad)
    if output and getattr(module, "bias", None) is not None:
        b = module.bias
        module.bias = nn.Parameter(b.detach().index_select(0, index.to(b.device)).clone(), requires_grad=b.requires_grad)
    size = index.numel()
    if conv1d:
        if output:
            module.nf = size
        else:
            module.nx = size
    elif output:
        module.out_features = size
    else:
        module.in_features = size


def _plan(attn: Attention, remove: Sequence[int]) -> tuple[list[int], list[int]]:
    """(kept query heads, kept key/value heads) after removing ``remove``; checks the GQA structure."""
    h, g = attn.num_heads, attn.group_size
    bad = [r for r in remove if not (0 <= int(r) < h)]
    if bad:
        raise ValueError(f"block {attn.block}: head {bad[0]} out of range (the block has {h} heads)")
    removed = {int(r) for r in remove}
    kept = [i for i in range(h) if i not in removed]
    if not kept:
        raise ValueError(f"block {attn.block}: cannot remove all {h} heads; remove the block instead (remove_layers)")
    per_group = [sum(1 for i in kept if i // g == j) for j in range(attn.num_kv_heads)]
    kept_kv = [j for j, c in enumerate(per_group) if c > 0]
    counts = sorted({per_group[j] for j in kept_kv})
    if len(counts) > 1:
        raise ValueError(
            f"block {attn.block}: grouped-query attention needs the same number of query heads per key/value head, "
            f"but removing {sorted(removed)} would keep {[per_group[j] for j in kept_kv]} per group; remove whole "
            "groups or the same number of heads from every group"
        )
    return kept, kept_kv


def _check_unmasked(attn: Attention) -> None:
    for m in (attn.q, attn.k, attn.v, attn.o, attn.qkv):
        if m is not None and parametrize.is_parametrized(m):
            raise ValueError(
                f"{attn.name} has pruning masks; call prunekit.finalize(model) before removing heads"
            )


def _apply(attn: Attention, kept: list[int], kept_kv: list[int]) -> None:
    d = attn.head_dim
    dev = attn.o.weight.device
    q_idx = _index(kept, d, dev)
    if attn.style == "gpt2":
        e = attn.num_heads * d
        take_channels(attn.qkv, torch.cat([q_idx, q_idx + e, q_idx + 2 * e]), output=True)
        take_channels(attn.o, q_idx, output=False)
        set_head_counts(attn, len(kept), len(kept))
        return
    kv_idx = _index(kept_kv, d, dev)
    take_channels(attn.q, q_idx, output=True)
    take_channels(attn.k, kv_idx, output=True)
    take_channels(attn.v, kv_idx, output=True)
    take_channels(attn.o, q_idx, output=False)
    set_head_counts(attn, len(kept), len(kept_kv))


def set_head_counts(attn: Attention, heads: int, kv_heads: int) -> None:
    """Set the attention module's head attributes (its projections already have the new shapes)."""
    m, d = attn.module, attn.head_dim
    if attn.style == "gpt2":
        m.num_heads = heads
        m.split_size = heads * d
    elif attn.style == "llama":
        m.num_key_value_groups = heads // kv_heads
    elif attn.style == "opt":
        m.num_heads = heads
    elif attn.style == "bert":
        m.num_attention_heads = heads
        m.all_head_size = heads * d


def sync_attention_config(model: nn.Module, attns: Sequence[Attention] | None = None) -> None:
    """Record every block's head counts in ``config.prunekit_attention``; for Llama-style models with equal
    counts in every block, update ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` too."""
    config = getattr(model, "config", None)
    if config is None:
        return
    attns = attention_layers(model) if attns is None else attns
    heads = [a.num_heads for a in attns]
    kv = [a.num_kv_heads for a in attns]
    config.prunekit_attention = {"num_heads": heads, "num_kv_heads": kv, "head_dim": attns[0].head_dim}
    if attns[0].style == "llama" and len(set(heads)) == 1 and len(set(kv)) == 1:
        fields = ("num_attention_heads", "num_key_value_heads", "head_dim")
        old = {f: getattr(config, f, None) for f in fields}
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads[0], kv[0], attns[0].head_dim
        try:  # transformers' strict configs may refuse, e.g. Llama's hidden_size % num_attention_heads check
            validate = getattr(config, "validate", None)
            if callable(validate):
                validate()
        except Exception:  # noqa: BLE001 - the counts stay in prunekit_attention; load_pretrained reloads them
            for f, value in old.items():
                setattr(config, f, value)


def remove_heads(model: nn.Module, heads: Mapping[int, Sequence[int]], blocks: str | None = None) -> dict[int, list[int]]:
    """Physically remove query heads: ``heads = {block_index: [head, ...]}``. Returns the kept heads per
    changed block (original indices). Everything is checked before anything changes."""
    attns = attention_layers(model, blocks)
    plans = {}
    for block, remove in heads.items():
        if not (0 <= int(block) < len(attns)):
            raise ValueError(f"block {block} out of range (the model has {len(attns)} blocks)")
        attn = attns[int(block)]
        _check_unmasked(attn)
        if len(remove):
            plans[int(block)] = _plan(attn, remove)
    for block, (kept, kept_kv) in plans.items():
        _apply(attns[block], kept, kept_kv)
    sync_attention_config(model, attns)
    return {block: kept for block, (kept, _) in plans.items()}


def select_heads(
    scores: Sequence[Tensor], attns: Sequence[Attention], amount: float, scope: str = "global", gqa: str = "group"
) -> dict[int, list[int]]:
    """Which heads to remove: the lowest-scoring ``amount`` (fraction of all query heads).

    Units: single heads for multi-head attention; for grouped-query attention whole key/value groups
    (``gqa="group"``, scored by the sum of their heads) or the same number of query heads in every group
    (``gqa="query"``, ``scope="uniform"`` only). ``scope="uniform"`` removes the same number in every
    block (the config stays expressible); ``"global"`` ranks all units together and never empties a block.
    """
    if not (0 <= amount < 1):
        raise ValueError(f"amount must be a fraction of the heads in [0, 1), got {amount!r}")
    if scope not in ("global", "uniform"):
        raise ValueError(f"scope must be 'global' or 'uniform', got {scope!r}")
    if gqa not in ("group", "query"):
        raise ValueError(f"gqa must be 'group' or 'query', got {gqa!r}")
    if gqa == "query" and scope != "uniform":
        raise ValueError("gqa='query' removes the same number of heads from every group: use scope='uniform'")
    units: list[tuple[float, int, list[int]]] = []  # (score, block, heads)
    per_block: list[list[tuple[float, list[int]]]] = []
    for s, a in zip(scores, attns):
        g = a.group_size if gqa == "group" else 1
        block_units = [(float(s[j * g : (j + 1) * g].sum()), list(range(j * g, (j + 1) * g))) for j in range(a.num_heads // g)]
        per_block.append(block_units)
        units += [(sc, a.block, hs) for sc, hs in block_units]
    remove: dict[int, list[int]] = {a.block: [] for a in attns}
    if scope == "uniform":
        for a, s, block_units in zip(attns, scores, per_block):
            if gqa == "query":
                r = int(round(amount * a.group_size))
                r = min(r, a.group_size - 1)
                grouped = s.reshape(a.num_kv_heads, a.group_size)
                low = torch.topk(grouped, r, dim=1, largest=False).indices if r else grouped[:, :0].long()
                remove[a.block] = sorted(int(j * a.group_size + i) for j in range(a.num_kv_heads) for i in low[j].tolist())
            else:
                r = min(int(round(amount * len(block_units))), len(block_units) - 1)
                for _, hs in sorted(block_units, key=lambda u: u[0])[:r]:
                    remove[a.block] += hs
    else:
        total = sum(a.num_heads for a in attns)
        target = int(round(amount * total))
        left = {a.block: len(u) for a, u in zip(attns, per_block)}
        removed = 0
        for sc, block, hs in sorted(units, key=lambda u: (u[0], u[1])):
            if removed + len(hs) > target:
                break
            if left[block] <= 1:
                continue
            remove[block] += hs
            left[block] -= 1
            removed += len(hs)
    return {b: sorted(r) for b, r in remove.items() if r}


def prune_heads(
    model: nn.Module,
    calibration: Any = None,
    amount: float = 0.25,
    method: str = "gradient",
    *,
    scope: str = "global",
    gqa: str = "group",
    loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor] | None = None,
    batch_size: int = 8,
    blocks: str | None = None,
) -> dict[int, list[int]]:
    """Score heads (:func:`head_importance`), pick the lowest ``amount`` of them (:func:`select_heads`)
    and remove them (:func:`remove_heads`). Returns the removed heads per block (original indices)."""
    attns = attention_layers(model, blocks)
    for a in attns:
        _check_unmasked(a)
    scores = head_importance(model, calibration, method, loss_fn=loss_fn, batch_size=batch_size, blocks=blocks)
    chosen = select_heads(scores, attns, amount, scope, gqa)
    remove_heads(model, chosen, blocks)
    return chosen
