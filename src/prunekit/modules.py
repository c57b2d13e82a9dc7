"""Facts about ``nn.Module`` trees that every part of prunekit relies on, each stated once.

* :func:`matches`: what a module or parameter name pattern means (a name, a glob, and everything inside).
* :func:`eval_mode` / :func:`training_mode`: switch a model's mode for a while, then give every module
  back its own ``training`` flag.
* :func:`call_model` / :func:`split_inputs`: call a model on example inputs (a tensor, a tuple of positional
  arguments, or a mapping of keyword arguments).
* :func:`replace_module`: swap the child at a dotted name.
* :func:`is_gpt_conv1d`: transformers' GPT-2 ``Conv1D`` (a Linear whose weight is stored ``(in, out)``).
* :func:`fraction_pruned`: the fraction of zeros in a mask.
* :func:`named_persistent_buffers`: the buffers a state dict holds, without those of parametrizations.
* :func:`check_model`: an ``nn.Module`` with real weights (not on the ``meta`` device), or a clear error.

A leaf: it imports only torch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

__all__ = [
    "Inputs",
    "matches",
    "eval_mode",
    "training_mode",
    "split_inputs",
    "call_model",
    "replace_module",
    "is_gpt_conv1d",
    "fraction_pruned",
    "named_persistent_buffers",
    "check_model",
]

Inputs = Any  # a tensor, a tuple of positional arguments, or a mapping of keyword arguments


def matches(name: str, pattern: str, inside: bool = True) -> bool:
    """Whether ``pattern`` names ``name``: the same name, or an ``fnmatch`` glob (``*`` crosses dots, case
    matters), or, with ``inside`` (the default), a module that holds it (``"fc1"`` names ``"fc1.weight"``
    and ``"block.0"`` names ``"block.0.attn"``). ``inside=False`` is for names that hold nothing, such as a
    parameter named on its own."""
    if name == pattern or fnmatch.fnmatchcase(name, pattern):
        return True
    return inside and name.startswith(pattern + ".")


@contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``model`` (and every submodule) in training or eval mode, then restore each module's own flag
    (not the root's flag everywhere: a frozen BatchNorm in eval mode inside a training model stays so)."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def eval_mode(model: nn.Module) -> Any:
    """``with eval_mode(model):`` runs in eval mode; every module's ``training`` flag is restored after."""
    return training_mode(model, False)


def split_inputs(example_inputs: Inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call on ``example_inputs``: a mapping gives keyword arguments, a tuple
    positional ones, anything else (a tensor) is the only positional argument."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def call_model(model: nn.Module, example_inputs: Inputs) -> Any:
    """``model(...)`` on example inputs, read as :func:`split_inputs` reads them."""
    args, kwargs = split_inputs(example_inputs)
    return model(*args, **kwargs)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted ``name`` inside ``model`` and return the module it replaces."""
    if not name:
        raise ValueError("cannot replace the root module itself; give a submodule's name")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def is_gpt_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a Linear whose weight is stored transposed, as ``(in, out)``.

    The MRO is checked, not the class: once a mask is attached, the module's class is torch's injected
    ``ParametrizedConv1D``; and transformers need not be installed to recognise one."""
    return any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf")


def fraction_pruned(mask: Tensor | None) -> float:
    """Fraction of zero entries of ``mask`` (or of any tensor); ``None`` (no mask) is 0.0."""
    return 0.0 if mask is None else 1.0 - int(mask.count_nonzero()) / mask.numel()


def named_persistent_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(full name, buffer)`` of every persistent buffer (what ``state_dict`` stores), except those inside
    parametrizations (``<module>.parametrizations.<param>.<i>``: there, prunekit's masks). A buffer
    registered in two modules comes once under each name."""
    for module_name, module in model.named_modules():
        if "parametrizations" in module_name.split("."):
            continue
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


def check_model(model: Any, what: str = "prune") -> nn.Module:
    """``model`` itself, when it is an ``nn.Module`` whose parameters hold values; else a clear error
    (``TypeError`` for another object, ``ValueError`` for weights on the ``meta`` device)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prunekit needs a torch nn.Module to {what}; got {type(model).__name__}")
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        shown = ", ".join(on_meta[:3]) + (f" and {len(on_meta) - 3} more" if len(on_meta) > 3 else "")
        raise ValueError(
            f"{shown} on the meta device: there are no weights to {what}; load them first "
            "(pk.load materialises a meta model)"
        )
    return model
