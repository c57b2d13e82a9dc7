"""Pruning under ``torch.nn.parallel.DistributedDataParallel``: the same masks on every rank.

Every decision prunekit takes (which weights go, which are regrown, which scores are kept) must be the
same on every process, or the replicas drift apart. Two rules, applied in one place:

* statistics are **reduced across ranks** before they are used (gradient sums, counts, dense
  gradients), so the decision sees all the data, not one shard of it;
* the decision itself is then **taken on rank 0 and broadcast**, so the masks are identical bit for bit
  even where floating-point reductions or ties could differ between processes.

When a default process group is initialised with more than one process, ``prunekit.prune``,
``Pruner.step`` and the dynamic-sparsity updaters are *collective* calls: every rank must make them, in
the same order (as with any DDP training step). Inside ``with prunekit.distributed.local():`` they act
on this process only (for example to prune a copy on rank 0 before saving it).

DDP-wrapped models may be passed anywhere a model is expected: ``unwrap`` takes the module inside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import masking

__all__ = [
    "unwrap",
    "is_distributed",
    "rank",
    "world_size",
    "local",
    "all_reduce_sum_",
    "broadcast_",
    "broadcast_masks",
    "reduce_statistics",
    "sync_masks",
]

_local_depth = 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``model`` otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def is_distributed() -> bool:
    """True when a process group with more than one process is active (and not inside ``local()``)."""
    if _local_depth or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within this block prunekit does not communicate: calls act on this process only."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def _flat(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _unflat_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view(t.shape).to(t.dtype))
        offset += n


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` over all ranks, in place, in one collective per dtype (no-op when not distributed)."""
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        flat = _flat(group, dtype)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        _unflat_into(flat, group)


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` with rank ``src``'s values, in place (bool tensors travel as uint8)."""
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        wire = torch.uint8 if t.dtype == torch.bool else t.dtype
        by_dtype.setdefault(wire, []).append(t)
    for wire, group in by_dtype.items():
        flat = _flat(group, wire)
        torch.distributed.broadcast(flat, src=src)
        _unflat_into(flat, group)


def broadcast_masks(masks: Mapping[str, Tensor], src: int = 0) -> dict[str, Tensor]:
    """Rank ``src``'s masks on every rank (the same names, in the same order, on every rank)."""
    out = {name: m.to(torch.bool).clone() for name, m in masks.items()}
    broadcast_(list(out.values()), src)
    return out


def reduce_statistics(stats: Mapping[str, object]) -> None:
    """Sum gradient statistics (``TargetStatistics``: count and running sums) over all ranks, in place.

    Afterwards every rank holds the statistics of all ranks' batches, so means divide by the global
    count. Sums missing on one rank cannot be reduced and raise instead of hanging.
    """
    if not is_distributed():
        return
    names = list(stats)
    fields = ("grad_abs_sum", "grad_sq_sum", "fisher_sum", "movement")
    present = torch.tensor(
        [[getattr(stats[n], f) is not None for f in fields] for n in names], dtype=torch.uint8
    ).reshape(-1)
    both = torch.cat([present, 1 - present])  # min over ranks of p and of 1 - p sum to 1 iff all agree
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MIN)
    if not bool((both[: present.numel()] + both[present.numel() :] == 1).all()):
        raise RuntimeError("ranks collected different statistics; every rank must see the same targets")
    tensors = [getattr(stats[n], f) for n in names for f in fields if getattr(stats[n], f) is not None]
    device = tensors[0].device if tensors else torch.device("cpu")
    counts = torch.tensor([[float(stats[n].count), float(stats[n].samples)] for n in names],
                          dtype=torch.float64, device=device)
    all_reduce_sum_([counts, *tensors])
    for n, (c, k) in zip(names, counts.tolist()):
        stats[n].count, stats[n].samples = round(c), round(k)


def sync_masks(model: nn.Module, src: int = 0) -> dict[str, Tensor]:
    """Make every mask of ``model`` equal to rank ``src``'s (the masks must exist on every rank)."""
    model = unwrap(model)
    found = masking.masks(model)
    if not is_distributed():
        return found
    synced = broadcast_masks(found, src)
    for name, mask in synced.items():
        masking.set_mask(model, name, mask)
    return masking.masks(model)
