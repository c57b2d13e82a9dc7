"""Metrics of a (pruned) model, with ShrinkBench's definitions (Blalock et al., 2020).

* **Parameters** count *every* parameter once (weights, biases, norm layers, embeddings; tied parameters
  once). Non-zeros are counted on the tensors the forward pass sees, so masked entries are zeros.
  ``compression_ratio = total / nonzero``.
* **FLOPs** are measured with :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per
  multiply-add; convolutions, linear layers and matrix products). A layer's remaining FLOPs are its dense
  FLOPs times the density of its weights, i.e. the fraction of non-zero entries of its effective weight
  (ShrinkBench's rule). With a mask the effective weight is zero wherever the mask is, so this is the mask's
  density; after :func:`prunekit.masking.finalize` the same zeros are stored, so ``finalize`` does not
  change the answer. Ops outside layers that own weights (e.g. attention's ``q @ k.T``) keep their
  dense FLOPs. ``theoretical_speedup = dense / remaining``.
* **Latency** is the median wall-clock time of a forward pass, **size** the bytes of the model's
  safetensors file.

None of these functions change the model: modes are restored and nothing is written.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from . import masking
from ._format import format_bytes, format_count
from .modules import Inputs, call_model, eval_mode, named_persistent_buffers, split_inputs
from .serialization import file_bytes

__all__ = [
    "count_params",
    "compression_ratio",
    "flops",
    "theoretical_speedup",
    "latency",
    "latency_stats",
    "model_size",
    "file_size",
    "summary",
    "report_metrics",
    "deployed",
    "format_count",
    "format_bytes",
]

# --- helpers -------------------------------------------------------------------------------------


@contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    """In eval mode without grad, ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take a
    fused "fast path" whose kernels ``FlopCounterMode`` cannot see (it would count 0 FLOPs); counting
    disables it. The maths is the same, so the count is that of the fused path too."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _direct_owners(model: nn.Module) -> dict[int, list[masking.Owner]]:
    """``id(module)`` -> the parameters it holds itself (tied ones included, under each holder)."""
    direct: dict[int, list[masking.Owner]] = defaultdict(list)
    for owner_list in masking.parameter_owners(model).values():
        for owner in owner_list:
            direct[id(owner.module)].append(owner)
    return direct


def _density(owners: list[masking.Owner]) -> float:
    """Fraction of non-zero entries of a module's weights (its own parameters with 2+ dimensions)."""
    weights = [w for o in owners if (w := getattr(o.module, o.param_name)).dim() >= 2]
    total = sum(w.numel() for w in weights)
    if total == 0:
        return 1.0
    return sum(int(torch.count_nonzero(w)) for w in weights) / total


def _exclusive_flops(model: nn.Module, counts: dict[str, int]) -> dict[int, int]:
    """``id(module)`` -> FLOPs of ops run by the module itself, not by its children.

    ``FlopCounterMode`` names the root by its class name and every submodule by its path below it
    (``"Net.features.0"``), and attributes each op to the module running it *and all its ancestors*.
    """
    root = type(model).__name__
    exclusive: dict[int, int] = defaultdict(int)
    for path, module in model.named_modules(remove_duplicate=False):
        name = f"{root}.{path}" if path else root
        if name not in counts:
            continue
        children = sum(counts.get(f"{name}.{child}", 0) for child, _ in module.named_children())
        exclusive[id(module)] += max(0, counts[name] - children)
    return exclusive


def _flop_breakdown(model: nn.Module, example_inputs: Inputs) -> tuple[int, dict[str, tuple[int, float]]]:
    """Dense FLOPs of the whole forward pass, and ``{module name: (its own dense FLOPs, weight density)}``
    for every module that holds parameters."""
    with eval_mode(model), torch.no_grad(), _mha_fastpath(False):
        counter = FlopCounterMode(display=False)
        with counter:
            call_model(model, example_inputs)
        counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
        exclusive = _exclusive_flops(model, counts)
        direct = _direct_owners(model)
        layers = {
            name: (exclusive.get(id(module), 0), _density(direct[id(module)]))
            for name, module in model.named_modules()
            if id(module) in direct
        }
    return counts.get("Global", 0), layers


def _remaining(dense: int, layers: dict[str, tuple[int, float]]) -> int:
    removed = sum(layer_flops * (1.0 - density) for layer_flops, density in layers.values())
    return max(0, round(dense - removed))


def _type_name(module: nn.Module) -> str:
    """Class name, without the ``Parametrized`` subclass that parametrizations swap in."""
    cls = type(module)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(module) else cls.__name__


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return 1.0 if numerator == 0 else math.inf
    return numerator / denominator


# --- parameters ----------------------------------------------------------------------------------


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(total, nonzero)`` over every parameter of the model, each counted once.

    Biases, norm layers and embeddings count too; a parameter tied to several modules counts once.
    Non-zeros are counted on the tensors the forward pass sees, so masked entries are not counted, and
    neither are entries that are exactly zero for another reason (e.g. zero-initialised biases, as
    ShrinkBench does): a freshly initialised model may already have ``nonzero < total``.
    """
    total = nonzero = 0
    with torch.no_grad():
        for _, tensor in masking.named_effective_tensors(model):
            total += tensor.numel()
            nonzero += int(torch.count_nonzero(tensor))
    return total, nonzero


def compression_ratio(model: nn.Module) -> float:
    """``total / nonzero`` parameters (ShrinkBench's definition: every parameter counts).

    1.0 for a dense model; ``inf`` when every parameter is zero.
    """
    total, nonzero = count_params(model)
    return _ratio(total, nonzero)


# --- FLOPs ---------------------------------------------------------------------------------------


def flops(model: nn.Module, example_inputs: Inputs) -> tuple[int, int]:
    """``(dense, remaining)`` FLOPs of one forward pass on ``example_inputs``.

    ``dense`` is :class:`~torch.utils.flop_counter.FlopCounterMode`'s total (2 FLOPs per multiply-add).
    Each module holding weights (parameters with 2+ dimensions) keeps the FLOPs of the ops it runs
    itself times the fraction of non-zero entries of those weights; other FLOPs (ops outside such
    modules, e.g. attention matmuls) stay dense. Zeros count as pruned whether they come from a mask or
    were baked in by ``finalize``, so both give the same number.

    ``example_inputs`` is a tensor, a tuple of positional arguments or a dict of keyword arguments. The
    forward pass runs in eval mode under ``torch.no_grad()``; every module's mode is restored.
    """
    dense, layers = _flop_breakdown(model, example_inputs)
    return dense, _remaining(dense, layers)


def theoretical_speedup(model: nn.Module, example_inputs: Inputs) -> float:
    """Dense FLOPs / remaining FLOPs (1.0 for a dense model)."""
    dense, remaining = flops(model, example_inputs)
    return _ratio(dense, remaining)


# --- latency -------------------------------------------------------------------------------------


def _synchronize(model: nn.Module, example_inputs: Inputs) -> None:
    args, kwargs = split_inputs(example_inputs)
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]
    for device in {t.device for t in tensors if t.device.type == "cuda"}:
        torch.cuda.synchronize(device)


def latency_stats(
    model: nn.Module,
    example_inputs: Inputs,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
) -> dict[str, float]:
    """Time ``repeats`` forward passes after ``warmup`` untimed ones, in eval mode under
    ``torch.inference_mode()``, with :func:`time.perf_counter` (CUDA is synchronised around each call).

    ``threads`` sets ``torch.set_num_threads`` for the measurement only. Returns seconds per call:
    ``{"median", "mean", "min", "max", "stdev", "repeats", "warmup", "threads"}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    previous_threads = torch.get_num_threads()
    times = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with eval_mode(model), torch.inference_mode():
            for _ in range(warmup):
                call_model(model, example_inputs)
            for _ in range(repeats):
                _synchronize(model, example_inputs)
                start = time.perf_counter()
                call_model(model, example_inputs)
                _synchronize(model, example_inputs)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "min": min(times),
        "max": max(times),
        "stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads if threads is not None else previous_threads,
    }


def latency(
    model: nn.Module,
    example_inputs: Inputs,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
) -> float:
    """Median seconds per forward pass; see :func:`latency_stats`."""
    return latency_stats(model, example_inputs, warmup, repeats, threads)["median"]


# --- size ----------------------------------------------------------------------------------------


def _effective_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What the forward pass uses, by clean names: effective parameters (masks applied, tied ones
    once) and persistent buffers, except those of parametrizations (the masks themselves)."""
    tensors = {}
    with torch.no_grad():
        for name, tensor in masking.named_effective_tensors(model):
            tensors[name] = tensor
        seen = set()
        for name, buffer in named_persistent_buffers(model):
            if id(buffer) not in seen:
                seen.add(id(buffer))
                tensors[name] = buffer
    # safetensors wants contiguous CPU tensors that share no memory.
    out, pointers = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.data_ptr() in pointers:
            tensor = tensor.clone()
        pointers.add(tensor.data_ptr())
        out[name] = tensor
    return out


def model_size(model: nn.Module, sparse: bool = False) -> int:
    """Bytes of the model's safetensors file: its effective state dict (masks applied, clean names such
    as ``"fc1.weight"``, tied parameters once, persistent buffers, no mask buffers), serialised in memory.

    ``sparse=False`` (dense): pruned entries are stored as zeros, so pruning alone does not change the
    size. ``sparse=True``: the bytes ``prunekit.save(model, path, format="sparse")`` writes (without
    extra metadata; :func:`prunekit.serialization.file_bytes`): masked and mostly-zero tensors compressed (:mod:`prunekit.sparse_format`), masks
    included, tied parameters once. At 90% sparsity in float32 a weight costs about 10% of its dense
    bytes plus 1/32 for the bitmask.
    """
    if sparse:
        return len(file_bytes(model, "sparse"))
    return len(safetensors_save(_effective_state_dict(model)))


def file_size(path: str | os.PathLike) -> int:
    """Size of a file in bytes."""
    return os.path.getsize(path)


# --- summary table -------------------------------------------------------------------------------


def summary(model: nn.Module, example_inputs: Inputs = None, print_table: bool = True) -> list[dict]:
    """One row per module holding parameters, then a ``"total"`` row; optionally printed with ``rich``.

    Row keys: ``name``, ``type``, ``shape`` (of ``weight``, else of its first parameter), ``params``,
    ``nonzero``, ``sparsity`` (1 - nonzero/params over all the layer's parameters, weight and bias
    together; ``pk.sparsity(model, per_layer=True)`` gives each parameter apart), ``flops`` and ``remaining_flops`` (``None`` without
    ``example_inputs``). A tied parameter is counted in the row of its first holder only, so the rows'
    ``params`` add up to :func:`count_params`. The total row's FLOPs are the model's (:func:`flops`), so
    they include ops outside layers.
    """
    direct = _direct_owners(model)
    counted: set[int] = set()
    if example_inputs is not None:
        dense_total, layer_flops = _flop_breakdown(model, example_inputs)
    rows = []
    with torch.no_grad():
        for name, module in model.named_modules():
            owners = direct.get(id(module))
            if not owners:
                continue
            params = nonzero = 0
            for owner in owners:
                raw = masking.raw_parameter(owner.module, owner.param_name)
                if id(raw) in counted:
                    continue
                counted.add(id(raw))
                tensor = getattr(owner.module, owner.param_name)
                params += tensor.numel()
                nonzero += int(torch.count_nonzero(tensor))
            shapes = {o.param_name: tuple(getattr(module, o.param_name).shape) for o in owners}
            row = {
                "name": name or type(module).__name__,
                "type": _type_name(module),
                "shape": shapes.get("weight", next(iter(shapes.values()))),
                "params": params,
                "nonzero": nonzero,
                "sparsity": 1.0 - _ratio(nonzero, params) if params else 0.0,
                "flops": None,
                "remaining_flops": None,
            }
            if example_inputs is not None:
                dense, density = layer_flops[name]
                row["flops"], row["remaining_flops"] = dense, round(dense * density)
            rows.append(row)
    total, nonzero = count_params(model)
    total_row = {
        "name": "total",
        "type": "",
        "shape": None,
        "params": total,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / total if total else 0.0,
        "flops": None,
        "remaining_flops": None,
    }
    if example_inputs is not None:
        total_row["flops"], total_row["remaining_flops"] = dense_total, _remaining(dense_total, layer_flops)
    rows.append(total_row)
    if print_table:
        _print_summary(rows, with_flops=example_inputs is not None)
    return rows


def _print_summary(rows: list[dict], with_flops: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="prunekit summary")
    table.add_column("Layer", overflow="fold", min_width=min(12, max(len(r["name"]) for r in rows)))
    table.add_column("Type")
    table.add_column("Shape")
    for column in ["Params", "Nonzero", "Sparsity"] + (["FLOPs", "FLOPs left"] if with_flops else []):
        table.add_column(column, justify="right")
    for i, row in enumerate(rows):
        cells = [
            row["name"],
            row["type"],
            "" if row["shape"] is None else "×".join(map(str, row["shape"])),
            format_count(row["params"]),
            format_count(row["nonzero"]),
            f"{row['sparsity']:.1%}",
        ]
        if with_flops:
            cells += [format_count(row["flops"]), format_count(row["remaining_flops"])]
        table.add_row(*cells, end_section=i == len(rows) - 2, style="bold" if i == len(rows) - 1 else None)
    Console().print(table)


# --- everything at once --------------------------------------------------------------------------


def deployed(model: nn.Module) -> nn.Module:
    """The model without mask machinery: a finalized copy when it has masks, else itself."""
    if not masking.masks(model):
        return model
    return masking.finalize(copy.deepcopy(model))


def report_metrics(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    measure_latency: bool = True,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
) -> dict[str, Any]:
    """All metrics at once::

        {"params_total", "params_nonzero", "compression_ratio", "flops_dense", "flops_remaining",
         "theoretical_speedup", "latency_s", "size_bytes", "size_sparse_bytes"}

    ``latency_s`` is the median seconds per forward pass of the model as it would be deployed: a
    masked model is measured on a finalized copy (pruned weights stored as zeros), so the mask's own
    multiply is not charged to it. ``None`` when ``measure_latency=False``.
    """
    total, nonzero = count_params(model)
    dense, remaining = flops(model, example_inputs)
    return {
        "params_total": total,
        "params_nonzero": nonzero,
        "compression_ratio": _ratio(total, nonzero),
        "flops_dense": dense,
        "flops_remaining": remaining,
        "theoretical_speedup": _ratio(dense, remaining),
        "latency_s": latency(deployed(model), example_inputs, warmup, repeats, threads) if measure_latency else None,
        "size_bytes": model_size(model),
        "size_sparse_bytes": model_size(model, sparse=True),
    }
