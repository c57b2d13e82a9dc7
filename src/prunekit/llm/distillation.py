"""Recovery of a pruned transformer by distillation from the dense one: logit KL plus optional hidden-state loss.

``distill(student, teacher, data)`` trains the pruned ``student`` for a few hundred AdamW steps to
reproduce the dense ``teacher`` on calibration or user text:

* **logit loss** (causal LMs, and any model whose output has ``logits``): the Hinton et al. (2015)
  distillation term ``T^2 * KL(softmax(t / T) || softmax(s / T))`` per token, averaged over the real
  tokens (``attention_mask == 1``) only;
* **output loss** (encoders such as all-MiniLM, whose output has no logits): the normalised squared
  error of the last hidden states, ``sum ||s - t||^2 / sum ||t||^2`` over the real tokens, plus
  ``1 - cos`` of their mean-pooled sentence embeddings (the quantity :func:`embedding_similarity` reports);
* **hidden-state loss** (``hidden_weight > 0``): the same normalised squared error between the output of
  every student block and the teacher's hidden state at the matching depth, averaged over the blocks.
  When blocks were removed, student block ``j`` corresponds to teacher block ``layer_map[j]`` (the kept
  indices that :func:`prunekit.llm.remove_layers` returns); its output is matched with the hidden state
  the teacher feeds to the *next kept* block, ``layer_map[j + 1]`` (the output of teacher block
  ``layer_map[j + 1] - 1``, i.e. after the removed blocks in between), and the last student block with
  the teacher's last block. Without ``layer_map``, equal depths match block by block and a shallower
  student is spread evenly over the teacher (``layer_map[j] = round(j (L_t - 1) / (L_s - 1))``).

The teacher runs in eval mode under ``torch.no_grad`` and is never changed. The student runs in eval mode
too (no dropout: a short, deterministic recovery), and only its blocks are trained by default
(``train="all"`` trains embeddings, final norm and head as well). Masks survive: prunekit masks are
parametrizations (``weight = original * mask``), so pruned weights stay exactly zero through every step,
whatever the optimizer does to the stored ``original``. Structured students (fewer heads, narrower MLPs,
fewer blocks) need no special care: only the hidden width must match for the hidden-state loss.
The learning rate warms up linearly over the first ``min(10, steps // 10)`` steps, then follows a
cosine to zero; gradients are clipped to norm ``max_grad_norm``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import check_model
from .api import rich_progress
from .blocks import find_blocks
from .sequential import as_batches

__all__ = ["distill", "DistillReport", "distillation_kl", "normalized_mse", "TRAINABLE"]

#: which student parameters ``distill`` trains
TRAINABLE = ("blocks", "all")


@dataclass
class DistillReport:
    """What :func:`distill` did: the loss of every step and its parts (before the step's update)."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    logit_losses: list[float] = field(default_factory=list)  # KL (causal LMs) or the output loss (encoders)
    hidden_losses: list[float] = field(default_factory=list)
    layer_map: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "seconds": self.seconds, "losses": self.losses,
                "logit_losses": self.logit_losses, "hidden_losses": self.hidden_losses, "layer_map": self.layer_map}


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                    mask: Tensor | None = None) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per token, averaged over ``mask``'s tokens.

    Logits are ``(..., vocab)``; ``mask`` (the leading dimensions, 1 = a real token) defaults to every token.
    """
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(dim=-1)
    return _masked_mean(per_token, mask) * temperature**2


def normalized_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """``sum ||s - t||^2 / sum ||t||^2`` over the real tokens of ``(..., hidden)`` states (scale-free)."""
    err = (student.float() - teacher.float()).square().sum(dim=-1)
    ref = teacher.float().square().sum(dim=-1)
    if mask is not None:
        m = mask.to(err.dtype)
        err, ref = err * m, ref * m
    return err.sum() / ref.sum().clamp_min(1e-12)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def _pooled_cosine_loss(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """``1 - cos`` of mean-pooled embeddings (over real tokens), averaged over the sentences."""
    m = torch.ones(student.shape[:2], device=student.device) if mask is None else mask.to(student.device).float()
    def pool(h: Tensor) -> Tensor:
        return (h.float() * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9)
    return (1 - F.cosine_similarity(pool(student), pool(teacher), dim=-1)).mean()


def _default_layer_map(student_blocks: int, teacher_blocks: int) -> list[int]:
    if student_blocks == teacher_blocks:
        return list(range(teacher_blocks))
    if student_blocks == 1:
        return [0]
    return [round(j * (teacher_blocks - 1) / (student_blocks - 1)) for j in range(student_blocks)]


def _check_layer_map(layer_map: Sequence[int] | None, student_blocks: int, teacher_blocks: int) -> list[int]:
    if layer_map is None:
        return _default_layer_map(student_blocks, teacher_blocks)
    values = [int(i) for i in layer_map]
    if len(values) != student_blocks:
        raise ValueError(f"layer_map lists {len(values)} teacher blocks for a student with {student_blocks} blocks")
    if any(not 0 <= i < teacher_blocks for i in values):
        raise ValueError(f"layer_map {values}: every entry must be a teacher block in [0, {teacher_blocks - 1}]")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"layer_map {values} must be strictly increasing (the kept blocks, in order)")
    return values


def _targets(layer_map: list[int], teacher_blocks: int) -> list[int]:
    """The teacher block whose output each student block's output is matched with (see the module docstring)."""
    return [nxt - 1 for nxt in layer_map[1:]] + [teacher_blocks - 1]


class _BlockOutputs:
    """Forward hooks that keep the hidden-state output of chosen blocks during one forward pass."""

    def __init__(self, blocks: nn.ModuleList, indices: Sequence[int]) -> None:
        self.outputs: dict[int, Tensor] = {}
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in sorted(set(indices))]

    def _hook(self, index: int):
        def hook(module, args, output):
            self.outputs[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """``(logits or None, last hidden state or None)`` of one forward pass."""
    device = _device(model)
    kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs.setdefault("use_cache", False)
    out = model(**kwargs)
    if isinstance(out, Tensor):
        return (out, None) if out.dim() == 3 else (None, None)
    logits = getattr(out, "logits", None)
    hidden = getattr(out, "last_hidden_state", None)
    if logits is None and hidden is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        hidden = out[0]
    return logits, hidden


def _shared_parameters(a: nn.Module, b: nn.Module) -> bool:
    ids = {id(p) for p in a.parameters()}
    return any(id(p) in ids for p in b.parameters())


def _check_ids(model: nn.Module, batches: list[dict[str, Tensor]]) -> None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    size = getattr(emb, "num_embeddings", None)
    if size is None:
        return
    top = max(int(b["input_ids"].max()) for b in batches)
    low = min(int(b["input_ids"].min()) for b in batches)
    if top >= size or low < 0:
        raise ValueError(f"the data holds token id {top if top >= size else low}, outside the model's vocabulary "
                         f"of {size}: tokenize it with the model's own tokenizer")


def _schedule(steps: int) -> Callable[[int], float]:
    warmup = min(10, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int = 200,
    lr: float = 1e-4,
    temperature: float = 2.0,
    hidden_weight: float = 0.0,
    batch_size: int = 8,
    layer_map: Sequence[int] | None = None,
    blocks: str | None = None,
    train: str = "blocks",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    progress: bool | Callable[[int, int, float], None] = False,
) -> DistillReport:
    """Train the pruned ``student`` to reproduce the dense ``teacher`` on ``data``, in place (see the module docstring).

    Args:
        student: the pruned model (masked, or with fewer heads, MLP units or blocks); trained in place.
        teacher: the dense model it was pruned from; unchanged.
        data: token ids ``(samples, seq_len)`` (e.g. :func:`prunekit.llm.calibration_data`), a tokenizer output
            with ``input_ids`` and ``attention_mask`` (padding is left out of every loss), or an iterable of
            such batches. Batches are drawn in a seeded random order, epoch after epoch, for ``steps`` steps.
        steps: optimizer steps (AdamW).
        lr: peak learning rate.
        temperature: the softmax temperature ``T`` of the logit KL (the loss is scaled by ``T^2``).
        hidden_weight: weight of the hidden-state loss added to the logit (or output) loss; 0 turns it off.
        batch_size: sequences per step, when ``data`` is one tensor or mapping.
        layer_map: for each student block, the teacher block it came from (the kept indices, as
            :func:`prunekit.llm.remove_layers` returns them); only the hidden-state loss uses it.
        blocks: the path of the blocks' ``ModuleList`` when it cannot be found automatically.
        train: ``"blocks"`` (the transformer blocks' parameters) or ``"all"`` (every student parameter).
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: gradient clipping (``None``: none).
        seed: the order of the batches.
        progress: ``True`` for a rich progress bar, or a callable ``(step, steps, loss)``.

    Returns a :class:`DistillReport` with every step's loss. Everything is checked before the student changes
    (output shapes at the first step, before its update); a loss that turns non-finite later raises
    ``FloatingPointError`` and leaves the student with the steps taken until then.

    Why not ``prune(recovery="distill")``: ``prune``'s recovery refines each layer inside the block loop, on that
    layer's calibration inputs; distillation needs a dense copy as teacher and trains the whole model after any
    mix of ``prune``, ``prune_width`` and ``prune_layers``, so it is a call of its own.
    """
    # --- validate everything before any change ---------------------------------------------------
    check_model(student, "distill")
    check_model(teacher, "distill")
    if student is teacher:
        raise ValueError("student and teacher are the same model: distil a pruned copy (copy.deepcopy before pruning)")
    if _shared_parameters(student, teacher):
        raise ValueError("student and teacher share parameters: training the student would change the teacher; "
                         "prune a copy.deepcopy of the dense model")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not (isinstance(hidden_weight, (int, float)) and math.isfinite(hidden_weight) and hidden_weight >= 0):
        raise ValueError(f"hidden_weight must be a number >= 0, got {hidden_weight!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
    if train not in TRAINABLE:
        raise ValueError(f"train must be one of {', '.join(map(repr, TRAINABLE))}, got {train!r}")
    batches = as_batches(data, batch_size)
    _check_ids(student, batches)
    _check_ids(teacher, batches)
    _, student_blocks = find_blocks(student, blocks)
    _, teacher_blocks = find_blocks(teacher, blocks)
    kept = _check_layer_map(layer_map, len(student_blocks), len(teacher_blocks))
    targets = _targets(kept, len(teacher_blocks))
    params = list(student_blocks.parameters() if train == "blocks" else student.parameters())
    params = [p for p in dict.fromkeys(params) if p.is_floating_point()]
    if not params:
        raise ValueError("the student has no floating-point parameters to train")

    # --- train -----------------------------------------------------------------------------------------
    callback, stop = (None, None)
    if progress is True:
        callback, stop = rich_progress("distill", unit="steps", status="loss {value:.4f}")
    elif callable(progress):
        callback = progress
    flags = [(p, p.requires_grad) for p in student.parameters()]
    modes = [(m, m.training) for m in (*student.modules(), *teacher.modules())]
    hooks: list[_BlockOutputs] = []
    report = DistillReport(steps, 0.0, layer_map=kept)
    start = time.perf_counter()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        student.eval()
        teacher.eval()
        if hidden_weight > 0:
            hooks = [_BlockOutputs(student_blocks, range(len(student_blocks))), _BlockOutputs(teacher_blocks, targets)]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []
        for step in range(steps):
            if not order:
                order = torch.randperm(len(batches), generator=generator).tolist()
            batch = batches[order.pop()]
            mask = batch.get("attention_mask")
            with torch.no_grad():
                t_logits, t_hidden = _forward(teacher, batch)
            t_blocks = dict(hooks[1].outputs) if hooks else {}
            s_logits, s_hidden = _forward(student, batch)
            device = s_logits.device if s_logits is not None else (s_hidden.device if s_hidden is not None else None)
            token_mask = mask.to(device) if isinstance(mask, Tensor) and device is not None else None
            if s_logits is not None and t_logits is not None:
                if s_logits.shape != t_logits.shape:
                    raise ValueError(f"student logits {tuple(s_logits.shape)} and teacher logits "
                                     f"{tuple(t_logits.shape)} differ: the vocabularies must match")
                main = distillation_kl(s_logits, t_logits.to(device), float(temperature), token_mask)
            elif s_logits is None and t_logits is None and s_hidden is not None and t_hidden is not None:
                if s_hidden.shape != t_hidden.shape:
                    raise ValueError(f"student output {tuple(s_hidden.shape)} and teacher output "
                                     f"{tuple(t_hidden.shape)} differ in shape")
                t_hidden = t_hidden.to(device)
                main = normalized_mse(s_hidden, t_hidden, token_mask) + _pooled_cosine_loss(s_hidden, t_hidden, token_mask)
            else:
                raise ValueError(f"cannot compare the outputs: the student gives {'logits' if s_logits is not None else 'no logits'}, "
                                 f"the teacher {'logits' if t_logits is not None else 'no logits'} (and no hidden states "
                                 "to fall back on)")
            loss = main
            hidden_loss = None
            if hooks:
                s_blocks = hooks[0].outputs
                terms = []
                for j, t in enumerate(targets):
                    s_out, t_out = s_blocks[j], t_blocks[t].to(s_blocks[j].device)
                    if s_out.shape != t_out.shape:
                        raise ValueError(f"hidden-state loss: student block {j} gives {tuple(s_out.shape)}, teacher "
                                         f"block {t} {tuple(t_out.shape)}; the hidden width must match "
                                         "(use hidden_weight=0)")
                    terms.append(normalized_mse(s_out, t_out, token_mask))
                hidden_loss = torch.stack(terms).mean()
                loss = loss + float(hidden_weight) * hidden_loss
                hooks[0].outputs.clear()
                hooks[1].outputs.clear()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the distillation loss is {float(loss)} at step {step}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            report.losses.append(float(loss.detach()))
            report.logit_losses.append(float(main.detach()))
            if hidden_loss is not None:
                report.hidden_losses.append(float(hidden_loss.detach()))
            if callback is not None:
                callback(step, steps, report.losses[-1])
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        for m, mode in modes:
            m.training = mode
        if stop is not None:
            stop()
    report.seconds = time.perf_counter() - start
    return report
