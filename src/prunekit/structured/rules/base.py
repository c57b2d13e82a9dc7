"""The rule registry: which rule labels each layer type, function and tensor method.

A rule receives a :class:`~prunekit.structured.context.RuleContext` (the op, its argument values and
labels, the output value) and returns the output's labels: ``{dim: atoms}`` for a tensor, a list of
those for a tuple, ``None`` for a non-tensor. Along the way it says which parameter dimensions read
(``"in"``), write (``"out"``) or pass (``"through"``) the channels, makes atoms equal (``ctx.union``) and
pins what removal could not follow (``ctx.pin``). Every labelled input dimension is either mapped or
pinned; nothing is dropped silently.

Every family registers the same way: ``@rule_for_modules(types, resize=..., attributes=...)``,
``@rule_for_functions(*callables)``, ``@rule_for_methods(*names)``. Users add rules for their own layers
with :func:`register_rule`::

    def rule(ctx):                       # a layer scaling its input per channel by self.gain
        x = ctx.dims(ctx.raw(0))
        ctx.consume(ctx.tensor(ctx.module, "gain"), 0, x.get(1), "through")
        return dict(x)

    prunekit.structured.register_rule(MyGain, rule, attributes=("channels",))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._types import NONE

__all__ = ["ModuleRule", "Rule", "register_rule", "module_rule", "shape_rule", "find_rule", "rule_for_modules",
           "rule_for_functions", "rule_for_methods", "none_labels", "norm_dim", "first_input"]

#: a rule: ``rule(ctx) -> labels of the output``
Rule = Callable[[Any], Any]


@dataclass(frozen=True)
class ModuleRule:
    """How a layer type maps channels (``rule``), how it updates its attributes after surgery
    (``resize(module, sizes)``, see surgery.py) and which attributes describe its shape (``attributes``,
    saved by ``pk.save`` so that ``pk.load`` can rebuild a pruned model)."""

    rule: Rule
    resize: Callable[[nn.Module, Any], None] | None = None
    attributes: tuple[str, ...] = ()


_MODULE_RULES: dict[type, ModuleRule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


def rule_for_modules(*types: type[nn.Module], resize: Callable[[nn.Module, Any], None] | None = None,
                     attributes: Sequence[str] = ()) -> Callable[[Rule], Rule]:
    """Decorator: the rule of every type in ``types`` (replacing an earlier one)."""

    def add(rule: Rule) -> Rule:
        for module_type in types:
            if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
                raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
            _MODULE_RULES[module_type] = ModuleRule(rule, resize, tuple(attributes))
        return rule

    return add


def rule_for_functions(*targets: Any) -> Callable[[Rule], Rule]:
    """Decorator: the rule of every callable in ``targets`` (``torch.cat``, ``F.linear``, ``operator.add``)."""

    def add(rule: Rule) -> Rule:
        for target in targets:
            _FUNCTION_RULES[target] = rule
        return rule

    return add


def rule_for_methods(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: the rule of every tensor method in ``names`` (``"view"``, ``"add_"``)."""

    def add(rule: Rule) -> Rule:
        for name in names:
            _METHOD_RULES[name] = rule
        return rule

    return add


def register_rule(
    module_type: type[nn.Module],
    rule: Rule,
    resize: Callable[[nn.Module, Any], None] | None = None,
    attributes: Sequence[str] = (),
) -> None:
    """Register (or replace) the rule of ``module_type``; the type is then kept whole when tracing.

    ``resize(module, sizes)`` is called after surgery to update the layer's attributes (its parameters
    and buffers are already resized); ``attributes`` are the attribute names that describe its shape.
    """
    if not callable(rule):
        raise TypeError(f"rule must be callable, got {rule!r}")
    rule_for_modules(module_type, resize=resize, attributes=attributes)(rule)


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule of ``module``'s type, or of its nearest registered base class when the type runs that
    class's ``forward``. A subclass with its own ``forward`` (a channels-first LayerNorm, a
    weight-standardised convolution) computes something else: it gets no rule from its parent, so the
    tracer traces into it (or, kept whole, it is refused as an op without a rule)."""
    cls = type(module)
    for base in cls.__mro__:
        found = _MODULE_RULES.get(base)
        if found is not None:
            return found if base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None) else None
    return None


def shape_rule(module: nn.Module) -> ModuleRule | None:
    """The rule whose ``resize`` and ``attributes`` describe ``module``'s size attributes: of its type or
    nearest registered base class, even one whose ``forward`` it overrides (a weight-standardised
    convolution still keeps ``out_channels`` as ``nn.Conv2d`` does)."""
    for base in type(module).__mro__:
        found = _MODULE_RULES.get(base)
        if found is not None:
            return found
    return None


def find_rule(op: Any) -> Rule | None:
    """The rule of an op (anything with ``kind``, ``target`` and ``module``, see context.Op), or None."""
    if op.kind == "module":
        found = module_rule(op.module)
        return found.rule if found is not None else None
    if op.kind == "method":
        return _METHOD_RULES.get(op.target)
    return _FUNCTION_RULES.get(op.target)


def none_labels(n: int) -> Tensor:
    """Labels of ``n`` indices that carry no prunable channel."""
    return torch.full((n,), NONE, dtype=torch.long)


def norm_dim(d: int, ndim: int) -> int:
    """A dimension index made non-negative."""
    return d % ndim if ndim else 0


def first_input(ctx) -> Any:
    """The first argument of a layer call (its input)."""
    return ctx.raw(0, "input")
