"""Saving and loading physically pruned models without pickle.

``pk.save`` stores, in the safetensors metadata under ``"prunekit_structure"``, a JSON record of every
layer that surgery resized (its type, its shape attributes, the shapes of its parameters and buffers) and
of every residual block replaced by an identity. ``pk.load`` reads it and, before loading any value,
resizes a *fresh instance of the original architecture* to match: the same surgery attributes are set,
tensors get the recorded shapes (their values then come from the file), removed blocks become
identities. Everything is checked before the model changes.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..modules import replace_module
from .blocks import RemovedBlock
from .rules import shape_rule
from .surgery import RESIZED_ATTR, Sizes
from .undo import all_or_nothing

__all__ = ["STRUCTURE_KEY", "structure_metadata", "Structure"]

STRUCTURE_KEY = "prunekit_structure"
_VERSION = 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list, torch.Size)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"cannot record attribute value {value!r}")


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (a masked one's original) and buffers held by ``module`` itself."""
    out = {}
    names = [n for n, p in module._parameters.items() if p is not None]
    if parametrize.is_parametrized(module):
        names += list(module.parametrizations.keys())
    for name in names:
        if parametrize.is_parametrized(module, name):
            out[name] = module.parametrizations[name].original
        else:
            out[name] = module._parameters[name]
    for name, buf in module._buffers.items():
        if buf is not None:
            out[name] = buf
    return out


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls.__name__


def structure_metadata(model: nn.Module) -> dict[str, str]:
    """``{"prunekit_structure": json}`` for a physically pruned model, ``{}`` for any other."""
    removed = [name for name, m in model.named_modules() if isinstance(m, RemovedBlock)]
    modules = {}
    for name, module in model.named_modules():
        if not getattr(module, RESIZED_ATTR, False) or isinstance(module, RemovedBlock):
            continue
        rule = shape_rule(module)
        attributes = {a: _jsonable(getattr(module, a)) for a in (rule.attributes if rule else ())}
        tensors = {t: list(v.shape) for t, v in _own_tensors(module).items()}
        modules[name] = {"type": _type_name(module), "attributes": attributes, "tensors": tensors}
    if not removed and not modules:
        return {}
    return {STRUCTURE_KEY: json.dumps({"version": _VERSION, "removed_blocks": removed, "modules": modules},
                                      sort_keys=True)}


class Structure:
    """A recorded structure, read from a file's metadata."""

    def __init__(self, record: dict) -> None:
        if record.get("version") != _VERSION:
            raise ValueError(f"unsupported prunekit_structure version {record.get('version')!r}")
        self.removed: list[str] = list(record.get("removed_blocks", []))
        self.modules: dict[str, dict] = dict(record.get("modules", {}))

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Structure | None:
        raw = meta.get(STRUCTURE_KEY)
        if raw is None:
            return None
        try:
            return cls(json.loads(raw))
        except (json.JSONDecodeError, AttributeError, TypeError) as error:
            raise ValueError(f"the file's {STRUCTURE_KEY} metadata is unreadable: {error}") from None

    def check(self, model: nn.Module) -> list[str]:
        """Problems that would stop ``apply`` (module names and types that do not fit)."""
        modules = dict(model.named_modules())
        problems = []
        for name in self.removed:
            if name not in modules:
                problems.append(f"the file removed block {name!r}, which this model does not have")
        for name, rec in self.modules.items():
            module = modules.get(name)
            if module is None:
                if not any(name == r or name.startswith(r + ".") for r in self.removed):
                    problems.append(f"the file resized layer {name!r}, which this model does not have")
                continue
            if _type_name(module) != rec["type"] and not (rec["type"] == "PrunedMultiheadAttention"
                                                            and isinstance(module, nn.MultiheadAttention)):
                problems.append(f"{name}: the file has a {rec['type']}, the model a {_type_name(module)}")
                continue
            own = _own_tensors(module)
            for t in rec["tensors"]:
                if t not in own:
                    problems.append(f"{name}: the model has no tensor {t!r}")
        return problems

    def expected_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        """The model's clean state shapes as they will be once the structure is applied."""
        out = {k: v for k, v in shapes.items() if not any(k.startswith(r + ".") for r in self.removed)}
        for name, rec in self.modules.items():
            for t, shape in rec["tensors"].items():
                key = f"{name}.{t}" if name else t
                if key in out:
                    out[key] = tuple(shape)
        return out

    def apply(self, model: nn.Module) -> None:
        """Resize ``model`` (a fresh instance of the original architecture) to the recorded structure."""
        problems = self.check(model)
        if problems:
            raise ValueError("the saved structure does not fit this model: " + "; ".join(problems[:10]))
        with all_or_nothing(model):  # a structure that fails half-way leaves the model as it was
            for name in self.removed:
                if not isinstance(model.get_submodule(name), RemovedBlock):
                    replace_module(model, name, RemovedBlock())
            modules = dict(model.named_modules())
            with torch.no_grad():
                for name, rec in self.modules.items():
                    module = modules.get(name)
                    if module is None:
                        continue
                    own = _own_tensors(module)
                    for t, shape in rec["tensors"].items():
                        tensor = own[t]
                        if tuple(tensor.shape) != tuple(shape):
                            tensor.data = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
                            if isinstance(tensor, nn.Parameter):
                                tensor.grad = None
                        if parametrize.is_parametrized(module, t):
                            for p in module.parametrizations[t]:
                                if hasattr(p, "mask") and tuple(p.mask.shape) != tuple(shape):
                                    p.mask.data = torch.ones(shape, dtype=torch.bool, device=p.mask.device)
                    for attr, value in rec["attributes"].items():
                        setattr(module, attr, tuple(value) if isinstance(value, list) else value)
                    setattr(module, RESIZED_ATTR, True)
                for name in self.modules:  # after every tensor has its shape: a layer may read its children's
                    module = modules.get(name)
                    rule = shape_rule(module) if module is not None else None
                    if rule is not None and rule.resize is not None:
                        rule.resize(module, Sizes(None))
