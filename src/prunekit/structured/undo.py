"""Undo for surgery: a failed structural change leaves the model exactly as it was.

``with all_or_nothing(model):`` records, before anything changes, what surgery may touch: every module's
class (surgery may swap it, as ``nn.MultiheadAttention`` becomes ``PrunedMultiheadAttention``), its
attribute dictionary and its parameter, buffer and child dictionaries (shallow copies: the objects in
them stay the same objects), every parameter's and buffer's ``data`` and ``grad`` (references, not
copies: surgery replaces ``data``, it never writes into it), and the attributes of a config object a
module holds (a transformers ``config`` whose sizes follow surgery), and copies of the values of tensors the
block writes into. If the block raises, all of it is put back and the error propagates; a model that
surgery left half-changed cannot survive a raise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["all_or_nothing"]


def _config_objects(module: nn.Module) -> list[Any]:
    """Plain attribute objects that carry sizes (a transformers ``PretrainedConfig``)."""
    found = []
    for value in vars(module).values():
        if not isinstance(value, (nn.Module, Tensor)) and type(value).__name__.endswith("Config") \
                and hasattr(value, "__dict__"):
            found.append(value)
    return found


@contextmanager
def all_or_nothing(model: nn.Module, written: Iterable[Tensor] = ()) -> Iterator[None]:
    """Run the block; if it raises, restore ``model`` (modules, tensors, configs) as it was before.

    ``written`` are tensors the block writes into in place (masking zeroes pruned entries): their values
    are copied, and put back too."""
    modules = list(model.modules())
    saved_modules = [(m, m.__class__, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules))
                     for m in modules]
    tensors: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {}
    for m in modules:
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and id(t) not in tensors:
                tensors[id(t)] = (t, t.data, t.grad)
    configs = {id(c): (c, dict(vars(c))) for m in modules for c in _config_objects(m)}
    values = [(t, t.detach().clone()) for t in written]
    try:
        yield
    except BaseException:
        for m, cls, attributes, parameters, buffers, children in saved_modules:
            m.__class__ = cls
            vars(m).clear()
            vars(m).update(attributes)
            for now, then in ((m._parameters, parameters), (m._buffers, buffers), (m._modules, children)):
                now.clear()
                now.update(then)
        for t, data, grad in tensors.values():
            t.data = data
            if t.grad is not grad:
                t.grad = grad
        with torch.no_grad():
            for t, value in values:
                t.copy_(value)
        for config, attributes in configs.values():
            vars(config).clear()
            vars(config).update(attributes)
        raise
