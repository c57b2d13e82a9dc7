"""``prunekit.llm.prune``: one-shot SparseGPT, Wanda or magnitude pruning of a transformer, block by block."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..modules import check_model, eval_mode
from ..pruning import LayerReport, PruneReport
from ..scope import check_sparsity, warn_emptied
from .blocks import find_blocks
from .allocation import ALLOCATIONS, allocate
from .methods import LayerMethod, get_method, parse_pattern
from .recovery import RECOVERIES, Recovered
from .sequential import (SEQUENTIAL_MODES, BlockSource, RereadableBlockSource, as_batches, gather_layers,
                         outside_layers, prune_sequential)

__all__ = ["prune", "LLMPruneReport"]


@dataclass
class LLMPruneReport(PruneReport):
    """A :class:`prunekit.PruneReport` with per-block wall times and the methods' own error estimates."""

    blocks: str = ""
    block_seconds: list[float] = field(default_factory=list)
    layer_seconds: dict[str, float] = field(default_factory=dict)
    layer_errors: dict[str, float] = field(default_factory=dict)
    block_sparsity: list[float] = field(default_factory=list)  # the sparsity each block was pruned to

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(blocks=self.blocks, block_seconds=self.block_seconds, layer_seconds=self.layer_seconds,
                   layer_errors=self.layer_errors, block_sparsity=self.block_sparsity)
        return out


def rich_progress(method: str, console: Any = None, unit: str = "blocks",
                  status: str = "block {index}: {value:.2f} s") -> tuple[Callable[[int, int, float], None], Callable[[], None]]:
    """A rich progress bar over blocks (or other ``unit``s): ``(callback, stop)``; the callback takes
    ``(index, total, value)`` and shows ``status`` formatted with them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(f"[bold]{method}[/bold] {unit}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[last]}"), transient=False, console=console)
    bar.start()
    task = bar.add_task("prune", total=None, last="")

    def update(index: int, total: int, value: float) -> None:
        bar.update(task, total=total, completed=index + 1, last=status.format(index=index, value=value))

    return update, bar.stop


def _check_allocation(allocation: Any, num_blocks: int, nm: Any, method: LayerMethod, lam: float, threshold: float,
                      sparsity: float) -> list[float]:
    """The per-block sparsities for ``"uniform"`` or an explicit list; the target for data-driven allocations
    (computed later, from the dense model). Raises on bad input."""
    if isinstance(allocation, str):
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(map(repr, ALLOCATIONS))} or one sparsity per "
                             f"block, got {allocation!r}")
        if allocation != "uniform":
            if nm is not None:
                raise ValueError(f"allocation={allocation!r} spreads unstructured sparsity; an N:M pattern fixes it")
            if not method.needs_data:
                raise ValueError(f"allocation={allocation!r} needs calibration data; method {method.name!r} uses none")
            if not 0 < float(lam) < 1:
                raise ValueError(f"allocation_range must be in (0, 1), got {lam!r}")
            if not float(threshold) > 0:
                raise ValueError(f"outlier_threshold must be positive, got {threshold!r}")
            if not (sparsity - lam >= 0 and sparsity + lam < 1):
                raise ValueError(f"sparsity {sparsity:g} +- allocation_range {lam:g} leaves [0, 1)")
        return [sparsity] * num_blocks
    values = [check_sparsity(float(v)) for v in allocation]
    if len(values) != num_blocks:
        raise ValueError(f"allocation lists {len(values)} sparsities for {num_blocks} blocks")
    if nm is not None:
        raise ValueError("a per-block allocation is for unstructured pruning; an N:M pattern fixes the sparsity")
    return values


def prune(
    model: nn.Module,
    calibration: Any = None,
    method: str | LayerMethod = "sparsegpt",
    sparsity: float | None = None,
    pattern: str | None = None,
    *,
    exclude: Iterable[str] | str = (),
    include: Iterable[str] | str = (),
    blocks: str | None = None,
    batch_size: int = 8,
    progress: bool | Callable[[int, int, float], None] = False,
    sequential: str = "block",
    allocation: str | Sequence[float] = "uniform",
    allocation_range: float = 0.08,
    outlier_threshold: float = 5.0,
    recovery: str | None = None,
    recovery_steps: int = 10,
    block_source: BlockSource | None = None,
    **options: Any,
) -> LLMPruneReport:
    """Prune every Linear (and GPT-2 ``Conv1D``) inside the transformer blocks of ``model``, in one shot.

    Args:
        model: a Hugging Face (or any) transformer: its blocks are the ``nn.ModuleList`` of identical layers
            (``model.layers``, ``model.decoder.layers``, ``transformer.h``, ``encoder.layer``); embeddings,
            the final norm and the LM head are outside the blocks and are never pruned.
        calibration: token ids ``(samples, seq_len)`` (see :func:`prunekit.llm.calibration_data`), a tokenizer
            output with ``input_ids`` and ``attention_mask``, or an iterable of such batches. Not needed by
            ``magnitude``. Padding tokens (``attention_mask == 0``) are left out of the statistics.
        method: ``"sparsegpt"`` (OBS weight updates), ``"wanda"`` (``|W| * ||X||``, per output row) or
            ``"magnitude"`` (per layer); ``prunekit.llm.LLM_METHODS`` lists them.
        sparsity: the fraction of each layer's weights to prune, in ``[0, 1)`` (default 0.5). With a
            ``pattern`` leave it out (or give ``1 - N/M``).
        pattern: an N:M pattern such as ``"2:4"`` or ``"4:8"`` (N kept in every M consecutive inputs).
        exclude: layer names or glob patterns to leave dense (``"*.mlp.down_proj"``, ``"model.layers.0"``,
            or a name inside each block such as ``"self_attn.o_proj"``).
        include: Linear layers outside the blocks to prune too (names or globs, e.g. ``"lm_head"``); they
            are pruned last, calibrated with full forward passes of the model whose blocks are pruned. A
            weight tied to another (an LM head tied to the embeddings) is refused.
        blocks: the path of the blocks' ``ModuleList`` when it cannot be found automatically.
        batch_size: calibration samples per forward pass.
        progress: ``True`` for a rich progress bar, or a callable ``(block_index, num_blocks, seconds)``.
        sequential: ``"block"`` (default): every layer of a block is calibrated on the dense block's
            activations. ``"layer"`` (true sequential, as SparseGPT's and Wanda's reference code and
            llm-compressor): the layers of a block are pruned group by group in call order (q/k/v, o,
            gate/up, down), each group's statistics taken with the groups before it already pruned.
        allocation: how the sparsity is spread over the blocks: ``"uniform"`` (every block at ``sparsity``),
            ``"owl"`` (outlier-weighted, Yin et al. 2024: blocks with more activation outliers are pruned
            less), ``"sensitivity"`` (blocks whose Wanda-pruning would remove more of their score energy are
            pruned less), or one sparsity per block. Non-uniform allocations keep the mean (weighted by
            the blocks' prunable weights) at ``sparsity``; they are for unstructured pruning.
        allocation_range: OWL's lambda: the block sparsities span ``sparsity +- allocation_range``.
        outlier_threshold: OWL's M: a score is an outlier above ``M`` times its block's mean score (5 in the
            paper, for LLaMA; all-MiniLM-L6-v2 needs 30, see the README's measurements).
        recovery: ``None``, or ``"lsq"``: after each layer is pruned, ``recovery_steps`` conjugate-gradient
            steps of layer-wise least squares on the calibration inputs refine its kept weights (the
            mask is kept; see :mod:`prunekit.llm.recovery`).
        recovery_steps: the number of those steps.
        block_source: for :func:`prunekit.llm.prune_from_disk`: loads each block's weights before it is
            pruned and writes and frees them after, so the model's blocks may be on the ``meta`` device
            (:class:`~prunekit.llm.sequential.BlockSource`). OWL and sensitivity allocation need its
            ``read_only()`` (:class:`~prunekit.llm.sequential.RereadableBlockSource`) for their dense pass.
        **options: method options, e.g. ``blocksize=128, percdamp=0.01`` for SparseGPT.

    Returns a report (per-layer sparsity, per-block time). The result is prunekit masks (plus updated
    weights for SparseGPT): ``prunekit.sparsity``, ``prunekit.finalize`` and ``prunekit.save`` work on it, and
    so does ``model.save_pretrained`` (the dense keys; plain ``from_pretrained`` loads the pruned weights).
    """
    # --- validate everything before any change ---------------------------------------------------
    if block_source is None:
        check_model(model)  # a module with real weights
    layer_method = get_method(method, **options)
    nm = parse_pattern(pattern)
    if nm is not None:
        if sparsity is not None and abs(float(sparsity) - nm.sparsity) > 1e-9:
            raise ValueError(
                f"the {nm.name} pattern fixes sparsity at {nm.sparsity:g}; got sparsity={sparsity!r} (leave it out)"
            )
        target_sparsity = nm.sparsity
    else:
        target_sparsity = check_sparsity(0.5 if sparsity is None else sparsity)
    blocks_name, block_list = find_blocks(model, blocks)
    layers = gather_layers(blocks_name, block_list, exclude)
    extra = outside_layers(model, blocks_name, include)
    if not any(layers) and not extra:
        raise ValueError("every layer of the blocks is excluded: nothing left to prune")
    for layer_list in [*layers, extra]:
        for layer in layer_list:
            if nm is not None and layer.in_features % nm.m:
                raise ValueError(
                    f"{nm.name} pattern: the input dimension of {layer.weight_name} has size "
                    f"{layer.in_features}, not divisible by M={nm.m}"
                )
            if not layer.module.weight.is_floating_point():
                raise TypeError(f"cannot prune {layer.weight_name}: it holds {layer.module.weight.dtype} values")
    batches = None
    if layer_method.needs_data:
        if calibration is None:
            raise ValueError(
                f"method {layer_method.name!r} needs calibration data: token ids (samples, seq_len), e.g. from "
                "prunekit.llm.calibration_data(tokenizer)"
            )
        batches = as_batches(calibration, batch_size)
    if sequential not in SEQUENTIAL_MODES:
        raise ValueError(f"sequential must be one of {', '.join(map(repr, SEQUENTIAL_MODES))}, got {sequential!r}")
    per_block = _check_allocation(allocation, len(block_list), nm, layer_method, allocation_range,
                                  outlier_threshold, target_sparsity)
    scored = isinstance(allocation, str) and allocation != "uniform"
    if scored and block_source is not None and not isinstance(block_source, RereadableBlockSource):
        raise ValueError(f"allocation={allocation!r} scores the dense blocks in a pass before pruning; the block_source "
                         f"{type(block_source).__name__} has no read_only() to load them for it (see "
                         "prunekit.llm.sequential.RereadableBlockSource); use 'uniform' or one sparsity per block")
    if recovery not in RECOVERIES:
        raise ValueError(f"recovery must be None or 'lsq', got {recovery!r}")
    if recovery is not None:
        layer_method = Recovered(layer_method, recovery_steps)

    # --- prune ---------------------------------------------------------------------------------------
    callback, stop = (None, None)
    if progress is True:
        callback, stop = rich_progress(layer_method.name)
    elif callable(progress):
        callback = progress
    try:
        with eval_mode(model), torch.no_grad():
            if scored:
                per_block = allocate(model, block_list, layers, batches, allocation, target_sparsity,
                                     allocation_range, outlier_threshold,
                                     block_source.read_only() if block_source is not None else None)
            records = prune_sequential(model, blocks_name, block_list, layers, layer_method, per_block, nm,
                                       batches, callback, extra, sequential, block_source)
    finally:
        if stop is not None:
            stop()

    rows = [LayerReport(r.name + ".weight", r.shape, r.numel, r.sparsity_before, r.sparsity_after)
            for block in records for r in block.layers]
    warn_emptied([(r.name, r.sparsity_after) for r in rows])
    report = LLMPruneReport(
        layer_method.name,
        nm.name if nm is not None else "element",
        "every block" if nm is not None else layer_method.unstructured_scope,
        target_sparsity,
        rows,
        blocks=blocks_name,
        block_seconds=[b.seconds for b in records[: len(block_list)]],
        layer_seconds={r.name + ".weight": r.seconds for b in records for r in b.layers},
        layer_errors={r.name + ".weight": r.error for b in records for r in b.layers if r.error is not None},
        block_sparsity=list(per_block),
    )
    return report
