"""The rules of every op the dependency graph follows, one family per module, all registered on import.

``base`` holds the registry (:func:`register_rule` for users' layers); the families register their rules
through it: ``elementwise`` (element-wise ops, activations, reductions), ``shape`` (views, permutes, cat,
split, indexing), ``pooling`` (pooling, padding, resampling), ``layers`` (linear, convolutions, norms,
embeddings) and ``attention`` (scaled dot-product attention, ``nn.MultiheadAttention``).
"""

from . import attention, elementwise, layers, pooling, shape  # noqa: F401  (each registers its rules)
from .base import ModuleRule, Rule, find_rule, module_rule, register_rule, shape_rule
from .elementwise import broadcast, passthrough
from .layers import conv_like, linear_like
from .shape import reshape_rule

__all__ = ["ModuleRule", "Rule", "register_rule", "module_rule", "shape_rule", "find_rule", "broadcast",
           "passthrough", "reshape_rule", "linear_like", "conv_like"]
