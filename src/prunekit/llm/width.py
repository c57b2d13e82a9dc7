"""Width pruning of transformer blocks: MLP channels and attention heads scored on calibration activations.

Scores, per input channel ``j`` of a block's down projection (``down_proj``, OPT's ``fc2``, GPT-2's
``mlp.c_proj``, BERT's ``output.dense``) or of its attention output projection (one head = its ``head_dim``
channels, summed), from the channel's activations ``X_j`` over the real calibration tokens:

* ``"flap"``: FLAP's fluctuation metric (An et al. 2024), ``Var(X_j) * ||W[:, j]||_2^2`` (sample variance
  over tokens times the squared norm of the weight column the channel feeds);
* ``"wanda"``: Wanda's score summed over the column, ``sum_i |W_ij| * ||X_j||_2 = ||W[:, j]||_1 * ||X_j||_2``;
* ``"magnitude"``: data-free, the L2 norm of every weight of the channel (the rows of the up/gate
  projections that produce it and the down-projection column that reads it; for heads,
  :func:`prunekit.llm.head_importance`'s ``"magnitude"``).

**Bias compensation** (FLAP): a removed channel is replaced by its calibration mean, so the projection's bias
gains ``W[:, removed] @ mean(X[removed])``; the pruned layer's output mean over the calibration tokens equals
the dense one exactly. A projection without a bias gets one when the architecture can store it (Llama's
``config.mlp_bias`` / ``attention_bias``: the sibling projections get zero biases so ``from_pretrained``
builds the same model); where it cannot (Mistral, Qwen2), ``compensate=None`` skips it and ``True`` raises.

**Removal** is physical (rows and columns deleted), reusing :mod:`prunekit.llm.heads` for the heads. Grouped
query attention keeps its structure: by default whole key/value groups go (``gqa="group"``), or the same number
of query heads from every group (``gqa="query"``, ``scope="uniform"``). ``scope="uniform"`` removes the same
number of channels (heads) from every block, so the config's ``intermediate_size`` (OPT ``ffn_dim``, GPT-2
``n_inner``) describes every block and plain ``from_pretrained`` reloads it; ``"global"`` standardises the
scores per block (FLAP's adaptive structure search) and ranks all blocks together. Every block's width is
recorded in ``config.prunekit_mlp`` (as head counts are in ``prunekit_attention``), from which
:func:`prunekit.llm.load_model` rebuilds widths that differ per block.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..modules import check_model, eval_mode, is_gpt_conv1d
from ..registry import unknown_name_message
from .blocks import find_blocks
from .heads import Attention, take_channels, attention_layers, head_importance, remove_heads, select_heads
from .layers import prune_layers
from .sequential import as_batches, capture_block_inputs, real_tokens, run_block
from .wanda import wanda_scores

__all__ = [
    "WIDTH_METHODS",
    "MLP",
    "find_mlp",
    "mlp_layers",
    "InputMoments",
    "channel_scores",
    "width_importance",
    "remove_mlp_channels",
    "prune_width",
    "prune_depth_width",
    "WidthReport",
]

WIDTH_METHODS = ("flap", "wanda", "magnitude")
SCOPES = ("uniform", "global")


# --- finding the MLPs ------------------------------------------------------------------------------------


@dataclass(eq=False)
class MLP:
    """The feed-forward part of one block: the layers producing the hidden width, and the one reading it."""

    block: int
    name: str
    style: str  # "gated" (gate/up/down), "fc" (OPT fc1/fc2), "gpt2" (Conv1D c_fc/c_proj), "bert"
    inputs: list[nn.Module]  # gate and up, or the one up projection: their output units are the channels
    down: nn.Module  # its input units are the channels

    @property
    def width(self) -> int:
        w = self.down.weight
        return w.shape[0] if is_gpt_conv1d(self.down) else w.shape[1]

    @property
    def modules(self) -> list[nn.Module]:
        return [*self.inputs, self.down]

    @property
    def config_field(self) -> str:
        """The config field holding the width: ``intermediate_size``, OPT's ``ffn_dim``, GPT-2's ``n_inner``."""
        return {"fc": "ffn_dim", "gpt2": "n_inner"}.get(self.style, "intermediate_size")


def _linear(*modules: Any) -> bool:
    return all(isinstance(m, nn.Linear) for m in modules)


def find_mlp(block: nn.Module, index: int = 0, prefix: str = "") -> MLP:
    """The MLP inside one block, or ``ValueError`` when none has a known layout."""
    for name, m in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        get = lambda a, m=m: getattr(m, a, None)  # noqa: E731
        if _linear(get("gate_proj"), get("up_proj"), get("down_proj")):
            return MLP(index, full, "gated", [m.gate_proj, m.up_proj], m.down_proj)
        if _linear(get("fc1"), get("fc2")):
            return MLP(index, full, "fc", [m.fc1], m.fc2)
        if is_gpt_conv1d(get("c_fc")) and is_gpt_conv1d(get("c_proj")):
            return MLP(index, full, "gpt2", [m.c_fc], m.c_proj)
        inter, out = get("intermediate"), get("output")
        if _linear(getattr(inter, "dense", None), getattr(out, "dense", None)):
            return MLP(index, full, "bert", [inter.dense], out.dense)
    raise ValueError(
        f"block {index} ({type(block).__name__}): no MLP with a known layout (gate_proj/up_proj/down_proj, "
        "fc1/fc2, GPT-2's c_fc/c_proj, or BERT's intermediate.dense/output.dense)"
    )


def mlp_layers(model: nn.Module, blocks: str | None = None) -> list[MLP]:
    """The MLP of every block, in order."""
    name, block_list = find_blocks(model, blocks)
    return [find_mlp(b, i, f"{name}.{i}") for i, b in enumerate(block_list)]


def _check_unmasked(modules: Sequence[nn.Module], where: str) -> None:
    if any(parametrize.is_parametrized(m) for m in modules):
        raise ValueError(f"{where} has pruning masks; call prunekit.finalize(model) before removing channels")


# --- statistics and scores -------------------------------------------------------------------------------


class InputMoments:
    """Count, mean and centred sum of squares of each input feature over tokens (float64, batches merged
    with Chan et al.'s update, so the variance does not lose digits to a large mean)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.mean = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        rows = max(1, 2**23 // max(x.shape[1], 1))  # float64 copies of at most 64 MB at a time
        if x.shape[0] > rows:
            for part in x.split(rows):
                self.add(part)
            return
        x = x.to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(dim=0)
        m2 = (x - mean).square().sum(dim=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.square() * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> Tensor:
        """The sample variance (``n - 1`` in the denominator, as FLAP)."""
        return self.m2 / max(self.count - 1, 1)

    @property
    def sq_sum(self) -> Tensor:
        """``||X_j||_2^2`` over the tokens."""
        return self.m2 + self.count * self.mean.square()


def _matrix(module: nn.Module) -> Tensor:
    """A Linear's or Conv1D's weight as an ``(out, in)`` float64 matrix."""
    w = module.weight.detach()
    return (w.t() if is_gpt_conv1d(module) else w).to(torch.float64)


def channel_scores(weight: Tensor, moments: InputMoments, method: str = "flap") -> Tensor:
    """One score per input channel of an ``(out, in)`` weight: ``"flap"`` ``Var(X_j) * ||W[:, j]||^2``,
    ``"wanda"`` ``||W[:, j]||_1 * ||X_j||_2``."""
    w = weight.to(torch.float64)
    if method == "flap":
        return moments.variance.to(w.device) * w.square().sum(dim=0)
    if method == "wanda":
        return wanda_scores(w, moments.sq_sum.to(w.device).sqrt()).sum(dim=0)
    raise ValueError(unknown_name_message("activation score", method, ("flap", "wanda")))


def _mlp_magnitude(mlp: MLP) -> Tensor:
    sq = _matrix(mlp.down).square().sum(dim=0)
    for m in mlp.inputs:
        sq = sq + _matrix(m).square().sum(dim=1)
    return sq.sqrt()


def _head_sums(channel: Tensor, attn: Attention) -> Tensor:
    return channel.reshape(attn.num_heads, attn.head_dim).sum(dim=1)


@dataclass
class _Importance:
    mlp: list[Tensor]  # per block, one score per channel (empty when not asked)
    heads: list[Tensor]  # per block, one score per query head
    mlp_moments: list[InputMoments | None]
    head_moments: list[InputMoments | None]


def _collect(model: nn.Module, calibration: Any, watch: Sequence[Sequence[nn.Module]], batch_size: int,
             blocks: str | None) -> list[list[InputMoments]]:
    """Input moments of the given layers of every block, on the dense model, one block at a time."""
    name, block_list = find_blocks(model, blocks)
    batches = as_batches(calibration, batch_size)
    out = []
    with eval_mode(model), torch.no_grad():
        inputs = capture_block_inputs(model, block_list, batches)
        current = [0]
        for i, block in enumerate(block_list):
            stats = [InputMoments(m.weight.shape[0] if is_gpt_conv1d(m) else m.weight.shape[1], m.weight.device)
                     for m in watch[i]]
            handles = [m.register_forward_pre_hook(
                lambda module, args, acc=acc: acc.add(real_tokens(args[0].detach(), inputs.token_masks[current[0]])))
                for m, acc in zip(watch[i], stats)]
            try:
                outs = []
                for b in range(len(batches)):
                    current[0] = b
                    outs.append(run_block(block, inputs, i, b).detach())
            finally:
                for handle in handles:
                    handle.remove()
            inputs.hidden = outs
            out.append(stats)
    return out


def _importance(model: nn.Module, calibration: Any, method: str, mlps: Sequence[MLP] | None,
                attns: Sequence[Attention] | None, batch_size: int, blocks: str | None) -> _Importance:
    n = len(mlps if mlps is not None else attns)
    mlp_scores: list[Tensor] = []
    head_scores: list[Tensor] = []
    mlp_m: list[InputMoments | None] = [None] * n
    head_m: list[InputMoments | None] = [None] * n
    if method == "magnitude":
        mlp_scores = [_mlp_magnitude(m).cpu() for m in mlps] if mlps is not None else []
        if attns is not None:
            head_scores = [s.double().cpu() for s in head_importance(model, method="magnitude", normalize=False,
                                                                blocks=blocks)]
        return _Importance(mlp_scores, head_scores, mlp_m, head_m)
    watch = [[*([mlps[i].down] if mlps is not None else []), *([attns[i].o] if attns is not None else [])]
             for i in range(n)]
    moments = _collect(model, calibration, watch, batch_size, blocks)
    for i, ms in enumerate(moments):
        ms = list(ms)
        if mlps is not None:
            mlp_m[i] = ms.pop(0)
            mlp_scores.append(channel_scores(_matrix(mlps[i].down), mlp_m[i], method).cpu())
        if attns is not None:
            head_m[i] = ms.pop(0)
            head_scores.append(_head_sums(channel_scores(_matrix(attns[i].o), head_m[i], method), attns[i]).cpu())
    return _Importance(mlp_scores, head_scores, mlp_m, head_m)


def width_importance(model: nn.Module, calibration: Any = None, method: str = "flap", *, batch_size: int = 8,
                     blocks: str | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """``(mlp_scores, head_scores)``: per block, one score per MLP channel and one per query head (higher =
    keep), from the dense model's activations on ``calibration`` (token ids or batches, as for
    :func:`prunekit.llm.prune`; not needed by ``"magnitude"``)."""
    _check_method(method, calibration)
    imp = _importance(model, calibration, method, mlp_layers(model, blocks), attention_layers(model, blocks),
                      batch_size, blocks)
    return [s.float() for s in imp.mlp], [s.float() for s in imp.heads]


def _check_method(method: str, calibration: Any) -> None:
    if method not in WIDTH_METHODS:
        raise ValueError(unknown_name_message("width method", method, WIDTH_METHODS))
    if method != "magnitude" and calibration is None:
        raise ValueError(f"width method {method!r} needs calibration data (token ids), e.g. from "
                         "prunekit.llm.calibration_data(tokenizer); or use method='magnitude'")


# --- selection -------------------------------------------------------------------------------------------


def _standardize(s: Tensor) -> Tensor:
    s = s.double()
    return (s - s.mean()) / s.std().clamp_min(1e-30) if s.numel() > 1 else s - s.mean()


def _select_channels(scores: Sequence[Tensor], ratio: float, scope: str) -> list[Tensor]:
    """Per block, the channels to remove (sorted): the lowest ``ratio`` of each block (``"uniform"``), or of
    all blocks' standardised scores together (``"global"``); every block keeps at least one channel."""
    if scope == "uniform":
        out = []
        for s in scores:
            r = min(int(round(ratio * s.numel())), s.numel() - 1)
            out.append(torch.topk(s, r, largest=False).indices.sort().values if r else torch.empty(0, dtype=torch.long))
        return out
    z = torch.cat([_standardize(s) for s in scores])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    offsets = torch.tensor([0] + [s.numel() for s in scores]).cumsum(0)
    target = int(round(ratio * z.numel()))
    order = torch.argsort(z, stable=True)
    # each block's best channel is never removed
    best = torch.stack([offsets[i] + torch.argmax(s) for i, s in enumerate(scores)])
    order = order[~torch.isin(order, best)][:target]
    return [(order[owner[order] == i] - offsets[i]).sort().values for i in range(len(scores))]


# --- removal ---------------------------------------------------------------------------------------------


def _bias_flag(style: str, kind: str) -> str | None:
    """The config flag that gives a Llama-style model's projections biases, or None."""
    if kind == "mlp":
        return "mlp_bias" if style == "gated" else None
    return "attention_bias" if style == "llama" else None


def _can_compensate(down: nn.Module, config: Any, flag: str | None) -> bool:
    if getattr(down, "bias", None) is not None:
        return True
    return flag is not None and config is not None and isinstance(getattr(config, flag, None), bool)


def _add_bias(module: nn.Module, delta: Tensor | None) -> None:
    """Add ``delta`` to the module's bias (creating a zero bias first when it has none)."""
    w = module.weight
    out = w.shape[1] if is_gpt_conv1d(module) else w.shape[0]
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
    if delta is not None:
        with torch.no_grad():
            module.bias += delta.to(dtype=module.bias.dtype, device=module.bias.device)


def _shift(down: nn.Module, removed: Tensor, mean: Tensor) -> Tensor:
    """``W[:, removed] @ mean[removed]``: the removed channels' mean contribution to the output."""
    if removed.numel() == 0:
        return torch.zeros(down.weight.shape[1 if is_gpt_conv1d(down) else 0], dtype=torch.float64)
    w = _matrix(down)[:, removed.to(down.weight.device)]
    return w @ mean.to(w.device)[removed.to(w.device)]


def remove_mlp_channels(model: nn.Module, channels: Mapping[int, Sequence[int] | Tensor], *,
                        bias: Mapping[int, Tensor] | None = None, blocks: str | None = None) -> list[int]:
    """Physically remove MLP channels: ``channels = {block: [channel, ...]}``; ``bias = {block: (hidden,)}`` is
    added to the down projection's bias (created where missing). Returns every block's new width. The
    config follows (see the module docstring). Everything is checked before anything changes."""
    mlps = mlp_layers(model, blocks)
    plans: dict[int, Tensor] = {}
    for block, removed in channels.items():
        if not 0 <= int(block) < len(mlps):
            raise ValueError(f"block {block} out of range (the model has {len(mlps)} blocks)")
        mlp = mlps[int(block)]
        _check_unmasked(mlp.modules, mlp.name)
        removed = torch.as_tensor(removed, dtype=torch.long).reshape(-1).unique().cpu()
        if removed.numel() and (int(removed.min()) < 0 or int(removed.max()) >= mlp.width):
            raise ValueError(f"block {block}: channels must be in [0, {mlp.width}), got {removed.tolist()}")
        if removed.numel() >= mlp.width:
            raise ValueError(f"block {block}: cannot remove all {mlp.width} MLP channels")
        keep = torch.ones(mlp.width, dtype=torch.bool)
        keep[removed] = False
        plans[int(block)] = keep.nonzero().flatten()
    bias = dict(bias or {})
    config = getattr(model, "config", None)
    need_flag = [b for b in bias if getattr(mlps[int(b)].down, "bias", None) is None]
    flag = _bias_flag(mlps[0].style, "mlp")
    if need_flag and not _can_compensate(mlps[int(need_flag[0])].down, config, flag):
        raise ValueError(f"{mlps[int(need_flag[0])].name}: the down projection has no bias and the config cannot "
                         "give it one; bias compensation is not possible for this architecture")
    for block, keep in plans.items():
        mlp = mlps[block]
        for m in mlp.inputs:
            take_channels(m, keep.to(m.weight.device), output=True)
        take_channels(mlp.down, keep.to(mlp.down.weight.device), output=False)
    if need_flag:  # the config's flag gives every MLP projection a bias: zero ones where there is none
        for mlp in mlps:
            for m in mlp.modules:
                _add_bias(m, None)
        config.mlp_bias = True
    for block, delta in bias.items():
        _add_bias(mlps[int(block)].down, delta)
    _sync_width(model, mlps)
    return [m.width for m in mlps]


def _sync_width(model: nn.Module, mlps: Sequence[MLP]) -> None:
    """Record every block's width in ``config.prunekit_mlp``; update the config's width field when uniform."""
    config = getattr(model, "config", None)
    if config is None:
        return
    config.prunekit_mlp = {"widths": [m.width for m in mlps]}
    widths = {m.width for m in mlps}
    if len(widths) == 1 and hasattr(config, mlps[0].config_field):
        setattr(config, mlps[0].config_field, widths.pop())


def _compensate_heads(model: nn.Module, attns: Sequence[Attention], removed: Mapping[int, Sequence[int]],
                      moments: Sequence[InputMoments | None]) -> dict[int, Tensor]:
    """Per block, the output-projection bias shift of the removed heads (computed before removal)."""
    shifts = {}
    for block, heads in removed.items():
        a = attns[block]
        idx = (torch.as_tensor(heads).reshape(-1, 1) * a.head_dim + torch.arange(a.head_dim)).reshape(-1)
        shifts[block] = _shift(a.o, idx, moments[block].mean)
    return shifts


def _apply_head_biases(model: nn.Module, shifts: Mapping[int, Tensor], blocks: str | None) -> None:
    attns = attention_layers(model, blocks)
    if any(getattr(attns[b].o, "bias", None) is None for b in shifts):
        for a in attns:  # the config's attention_bias gives q/k/v/o biases: zero ones where there is none
            for m in (a.q, a.k, a.v, a.o):
                _add_bias(m, None)
        model.config.attention_bias = True
    for block, delta in shifts.items():
        _add_bias(attns[block].o, delta)


# --- one call --------------------------------------------------------------------------------------------


@dataclass
class WidthReport:
    """What :func:`prune_width` (or :func:`prune_depth_width`) removed."""

    method: str
    mlp: float
    heads: float
    scope: str
    removed_channels: dict[int, list[int]] = field(default_factory=dict)  # block -> MLP channels (old indices)
    removed_heads: dict[int, list[int]] = field(default_factory=dict)  # block -> query heads (old indices)
    removed_layers: list[int] = field(default_factory=list)  # blocks removed first (depth), old indices
    mlp_widths: list[int] = field(default_factory=list)
    head_counts: list[int] = field(default_factory=list)
    compensated_mlp: bool = False
    compensated_heads: bool = False
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class _Plan:
    mlps: list[MLP] | None
    attns: list[Attention] | None
    compensate_mlp: bool
    compensate_heads: bool


def _validate(model: nn.Module, calibration: Any, mlp: float, heads: float, method: str, scope: str, gqa: str,
              compensate: bool | None, blocks: str | None) -> _Plan:
    check_model(model)
    for label, ratio in (("mlp", mlp), ("heads", heads)):
        if not isinstance(ratio, (int, float)) or not 0 <= float(ratio) < 1:
            raise ValueError(f"{label} must be the fraction to remove, in [0, 1), got {ratio!r}")
    _check_method(method, calibration)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if compensate is not None and not isinstance(compensate, bool):
        raise ValueError(f"compensate must be None (where possible), True or False, got {compensate!r}")
    config = getattr(model, "config", None)
    mlps = attns = None
    comp_mlp = comp_heads = False
    want = compensate is not False and method != "magnitude"
    if compensate and method == "magnitude":
        raise ValueError("bias compensation uses the calibration means; method 'magnitude' has none")
    if mlp > 0:
        mlps = mlp_layers(model, blocks)
        for m in mlps:
            _check_unmasked(m.modules, m.name)
        possible = all(_can_compensate(m.down, config, _bias_flag(m.style, "mlp")) for m in mlps)
        if compensate and not possible:
            raise ValueError(f"{mlps[0].name}.down has no bias and {type(config).__name__} cannot give it one: "
                             "bias compensation is not possible for this architecture (compensate=False)")
        comp_mlp = want and possible
    if heads > 0:
        attns = attention_layers(model, blocks)
        for a in attns:
            if any(m is not None and parametrize.is_parametrized(m) for m in (a.q, a.k, a.v, a.o, a.qkv)):
                raise ValueError(f"{a.name} has pruning masks; call prunekit.finalize(model) before removing heads")
        select_heads([torch.zeros(a.num_heads) for a in attns], attns, heads, scope, gqa)  # checks scope and gqa
        possible = all(_can_compensate(a.o, config, _bias_flag(a.style, "attention")) for a in attns)
        if compensate and not possible:
            raise ValueError(f"{attns[0].name}'s output projection has no bias and {type(config).__name__} cannot "
                             "give it one: bias compensation is not possible for this architecture (compensate=False)")
        comp_heads = want and possible
    if calibration is not None and method != "magnitude":
        as_batches(calibration)  # its checks, before anything runs
    return _Plan(mlps, attns, comp_mlp, comp_heads)


def prune_width(
    model: nn.Module,
    calibration: Any = None,
    mlp: float = 0.25,
    heads: float = 0.0,
    method: str = "flap",
    *,
    scope: str = "uniform",
    gqa: str = "group",
    compensate: bool | None = None,
    batch_size: int = 8,
    blocks: str | None = None,
) -> WidthReport:
    """Remove the fraction ``mlp`` of every block's MLP channels and ``heads`` of its attention heads, physically.

    Args:
        model: a Hugging Face transformer (Llama, Mistral, Qwen2, OPT, GPT-2, BERT, ...) without prunekit masks.
        calibration: token ids ``(samples, seq_len)``, a tokenizer output, or batches (as for
            :func:`prunekit.llm.prune`); padding tokens are left out. Not needed by ``"magnitude"``.
        mlp: fraction of MLP channels to remove, in ``[0, 1)``.
        heads: fraction of query heads to remove, in ``[0, 1)`` (GQA: see ``gqa``).
        method: ``"flap"`` (fluctuation, with bias compensation), ``"wanda"`` (``||W[:, j]||_1 * ||X_j||_2``)
            or ``"magnitude"`` (data-free).
        scope: ``"uniform"`` (the same count in every block; the config stays expressible) or ``"global"``
            (FLAP's adaptive structure: scores standardised per block, ranked across blocks).
        gqa: with grouped-query attention, ``"group"`` removes whole key/value groups, ``"query"`` the same
            number of query heads from every group (``scope="uniform"`` only).
        compensate: add the removed channels' calibration-mean contribution to the projection's bias.
            ``None``: for the data-driven methods, wherever the architecture can store the bias; ``True``
            raises where it cannot; ``False`` never.
        batch_size: calibration samples per forward pass.
        blocks: the path of the blocks' ``ModuleList`` when it cannot be found automatically.

    Everything is validated before the model changes. Save with :func:`prunekit.llm.save_pretrained` (or
    ``model.save_pretrained``); reload with :func:`prunekit.llm.load_model`.
    """
    start = time.perf_counter()
    plan = _validate(model, calibration, mlp, heads, method, scope, gqa, compensate, blocks)
    report = WidthReport(method, float(mlp), float(heads), scope, params_before=_count(model))
    if plan.mlps is not None or plan.attns is not None:
        imp = _importance(model, calibration, method, plan.mlps, plan.attns, batch_size, blocks)
        head_shifts: dict[int, Tensor] = {}
        if plan.attns is not None:
            scores = [_standardize(s).float() if scope == "global" else s.float() for s in imp.heads]
            chosen = select_heads(scores, plan.attns, heads, scope, gqa)
            if plan.compensate_heads:
                head_shifts = _compensate_heads(model, plan.attns, chosen, imp.head_moments)
            remove_heads(model, chosen, blocks)
            if head_shifts:
                _apply_head_biases(model, head_shifts, blocks)
            report.removed_heads = chosen
            report.compensated_heads = bool(head_shifts)
        if plan.mlps is not None:
            removal = _select_channels(imp.mlp, float(mlp), scope)
            shifts = ({i: _shift(plan.mlps[i].down, r, imp.mlp_moments[i].mean) for i, r in enumerate(removal)}
                      if plan.compensate_mlp else None)
            remove_mlp_channels(model, dict(enumerate(removal)), bias=shifts, blocks=blocks)
            report.removed_channels = {i: r.tolist() for i, r in enumerate(removal) if r.numel()}
            report.compensated_mlp = shifts is not None
    try:
        report.mlp_widths = [m.width for m in mlp_layers(model, blocks)]
    except ValueError:
        report.mlp_widths = []
    report.head_counts = [a.num_heads for a in attention_layers(model, blocks)]
    report.params_after = _count(model)
    report.seconds = time.perf_counter() - start
    return report


def prune_depth_width(
    model: nn.Module,
    calibration: Any,
    layers: int = 0,
    mlp: float = 0.25,
    heads: float = 0.0,
    method: str = "flap",
    *,
    layer_method: str = "angular",
    scope: str = "uniform",
    gqa: str = "group",
    compensate: bool | None = None,
    batch_size: int = 8,
    blocks: str | None = None,
) -> WidthReport:
    """Depth, then width: remove ``layers`` blocks (:func:`prunekit.llm.prune_layers`, Gromov et al.'s angular
    distance by default), then prune the width of the blocks left (:func:`prune_width`, its statistics taken
    on the shallower model). Everything is validated before the model changes."""
    _, block_list = find_blocks(model, blocks)
    if not isinstance(layers, int) or not 0 <= layers < len(block_list):
        raise ValueError(f"layers must be in [0, {len(block_list) - 1}], got {layers!r}")
    if calibration is None:
        raise ValueError("prune_depth_width needs calibration data (token ids)")
    _validate(model, calibration, mlp, heads, method, scope, gqa, compensate, blocks)
    before = _count(model)
    start = time.perf_counter()
    dropped = []
    if layers:
        dropped = prune_layers(model, calibration, layers, layer_method, batch_size=batch_size, blocks=blocks)
    report = prune_width(model, calibration, mlp, heads, method, scope=scope, gqa=gqa, compensate=compensate,
                         batch_size=batch_size, blocks=blocks)
    report.removed_layers = dropped
    report.params_before = before
    report.seconds = time.perf_counter() - start
    return report
