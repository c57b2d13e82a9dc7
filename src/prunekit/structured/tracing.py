"""Eager tracing: record, as a torch.fx graph, the operations that one forward pass really runs.

Why this tracer: ``torch.fx`` symbolic tracing fails on most real models (Hugging Face ``forward``s
branch on tensor values and shapes, iterate over proxies, call ``inspect`` and build caches), and
``torch.export`` graphs are ATen-level, far from the functions the rules are written for. Running the
model once on the example inputs under a :class:`~torch.overrides.TorchFunctionMode` sees every torch
function and ``Tensor`` method exactly as ``forward`` calls them (``F.linear``, ``.view``, ``torch.cat``,
``__getitem__``, ...) with their real arguments, so Python-level logic and data-dependent control flow
simply follow the path the example inputs take. Layers with a rule (Linear, convolutions, norms,
Embedding, GPT-2's ``Conv1D``, Hugging Face attentions, ...) are intercepted whole by wrapping
``nn.Module.__call__`` for the duration of the trace; the operations inside them are not recorded.

The record becomes an ordinary straight-line ``fx.Graph`` (placeholders for the inputs, ``get_attr`` for
parameters and buffers used directly, ``call_module`` for layers, ``call_function``/``call_method`` for
the rest), so the dependency graph runs the same explicit per-op rules over it as over an fx trace, and
an operation without a rule is still an error naming it. Sizes read from tensors (``x.shape``,
``x.size(d)``, ``x.numel()``) are returned as ints that remember where they came from, through ``+ - *
// %``, so a ``view`` to computed sizes follows a removal as it does under fx; a size that went through
anything else (``int()``, ``math``) is a constant, and the channels it reshapes are pinned. A branch not
taken on the example inputs is not checked; a reduction over channels that only steers a branch still
pins them (removing channels could change the branch).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..modules import eval_mode

__all__ = ["eager_trace"]

# Tensor dunders recorded as the operator fx would record; reflected ones swap their operands.
_DUNDERS: dict[str, tuple[Callable, bool]] = {
    "__add__": (operator.add, False), "__radd__": (operator.add, True), "__iadd__": (operator.iadd, False),
    "__sub__": (operator.sub, False), "__rsub__": (operator.sub, True), "__isub__": (operator.isub, False),
    "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True), "__imul__": (operator.imul, False),
    "__truediv__": (operator.truediv, False), "__rtruediv__": (operator.truediv, True),
    "__itruediv__": (operator.itruediv, False), "__div__": (operator.truediv, False),
    "__rdiv__": (operator.truediv, True), "__floordiv__": (operator.floordiv, False),
    "__rfloordiv__": (operator.floordiv, True), "__mod__": (operator.mod, False),
    "__pow__": (operator.pow, False), "__rpow__": (operator.pow, True), "__matmul__": (operator.matmul, False),
    "__rmatmul__": (operator.matmul, True), "__neg__": (operator.neg, False), "__pos__": (operator.pos, False),
    "__abs__": (abs, False), "__invert__": (operator.invert, False), "__and__": (operator.and_, False),
    "__rand__": (operator.and_, True), "__or__": (operator.or_, False), "__ror__": (operator.or_, True),
    "__xor__": (operator.xor, False), "__eq__": (operator.eq, False), "__ne__": (operator.ne, False),
    "__lt__": (operator.lt, False), "__le__": (operator.le, False), "__gt__": (operator.gt, False),
    "__ge__": (operator.ge, False), "__getitem__": (operator.getitem, False),
    "__setitem__": (operator.setitem, False),
}


class _SizeInt(int):
    """An int read from a tensor's size (or computed from such ints): its graph node is made when a
    recorded op uses it."""

    _make: Callable[[], fx.Node]
    _node: fx.Node | None

    @classmethod
    def of(cls, value: int, make: Callable[[], fx.Node]) -> _SizeInt:
        out = cls(value)
        out._make, out._node = make, None
        return out

    def node(self) -> fx.Node:
        if self._node is None:
            self._node = self._make()
        return self._node


def _size_arithmetic(name: str, target: Callable, swap: bool):
    def method(self, other):
        result = getattr(int, name)(self, other)
        if not isinstance(other, int) or isinstance(other, bool) or not isinstance(result, int):
            return result
        recorder = self._recorder
        operands = (other, self) if swap else (self, other)
        out = _SizeInt.of(result, lambda: recorder.graph.call_function(target, recorder.arg(operands)))
        out._recorder = recorder
        return out

    return method


for _name, (_target, _swap) in {"__add__": (operator.add, False), "__radd__": (operator.add, True),
                                "__sub__": (operator.sub, False), "__rsub__": (operator.sub, True),
                                "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True),
                                "__floordiv__": (operator.floordiv, False),
                                "__rfloordiv__": (operator.floordiv, True),
                                "__mod__": (operator.mod, False)}.items():
    setattr(_SizeInt, _name, _size_arithmetic(_name, _target, _swap))


def _contains_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_contains_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(_contains_tensor(v) for v in value.values())
    return False


class _Recorder(TorchFunctionMode):
    """Turns each top-level torch call into an fx node; tensors are matched to nodes by identity."""

    def __init__(self, model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.is_leaf = is_leaf
        self.nodes: dict[int, fx.Node] = {}
        self.alive: list[Any] = []  # keeps recorded tensors alive, so their ids stay unique
        self.suspended = 0
        self.names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.tensors = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
                model.named_buffers(remove_duplicate=False)):
            self.tensors.setdefault(id(t), name)

    # --- values to graph arguments ---------------------------------------------------------------
    def bind(self, value: Tensor, node: fx.Node) -> None:
        self.nodes[id(value)] = node
        self.alive.append(value)

    def arg(self, value: Any) -> Any:
        if isinstance(value, _SizeInt):
            return value.node()
        if isinstance(value, Tensor):
            node = self.nodes.get(id(value))
            if node is None and id(value) in self.tensors and value.is_floating_point():  # not index buffers
                node = self.graph.get_attr(self.tensors[id(value)])
                self.bind(value, node)
            return value if node is None else node  # an unknown tensor is a constant
        if isinstance(value, (tuple, list)):
            mapped = [self.arg(v) for v in value]
            if isinstance(value, torch.Size) and not any(isinstance(v, fx.Node) for v in mapped):
                return value
            return mapped if isinstance(value, list) else tuple(mapped)
        if isinstance(value, Mapping):
            return {k: self.arg(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(self.arg(value.start), self.arg(value.stop), self.arg(value.step))
        return value

    def outputs(self, node: fx.Node, value: Any) -> None:
        if isinstance(value, Tensor):
            self.bind(value, node)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                if isinstance(v, Tensor):
                    self.bind(v, self.graph.call_function(operator.getitem, (node, i)))

    # --- recording -------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suspended:
            return out
        name = getattr(func, "__name__", "")
        if name == "__setitem__":
            self.graph.call_function(operator.setitem, self.arg(tuple(args)), self.arg(kwargs))
            return out
        if not _contains_tensor(out):
            if args and isinstance(args[0], Tensor) and id(args[0]) in self.nodes:
                return self.size_read(func, name, args, kwargs, out)
            return out  # dtypes, booleans: the Python logic using them is already followed
        if name == "__get__":  # a property such as .T, .mT, .data, .real
            node = self.graph.call_function(getattr, (self.arg(args[0]), func.__self__.__name__))
        elif name in _DUNDERS:
            target, swap = _DUNDERS[name]
            operands = (args[1], args[0]) + tuple(args[2:]) if swap else tuple(args)
            node = self.graph.call_function(target, self.arg(operands), self.arg(kwargs))
        elif args and isinstance(args[0], Tensor) and getattr(Tensor, name, None) is func:
            node = self.graph.call_method(name, self.arg(tuple(args)), self.arg(kwargs))
        else:
            node = self.graph.call_function(func, self.arg(tuple(args)), self.arg(kwargs))
        self.outputs(node, out)
        return out

    def size_int(self, value: int, make: Callable[[], fx.Node]) -> _SizeInt:
        out = _SizeInt.of(value, make)
        out._recorder = self
        return out

    def size_read(self, func, name: str, args: tuple, kwargs: dict, out: Any) -> Any:
        """``x.shape``, ``x.size()``, ``x.size(d)``, ``x.numel()``: ints that remember their tensor."""
        x = self.nodes[id(args[0])]
        if name == "__get__" and func.__self__.__name__ == "shape" or name == "size" and isinstance(out, torch.Size):
            node = (self.graph.call_function(getattr, (x, "shape")) if name == "__get__"
                    else self.graph.call_method("size", (x,)))
            return torch.Size([self.size_int(v, (lambda i: lambda: self.graph.call_function(
                operator.getitem, (node, i)))(i)) for i, v in enumerate(out)])
        if name == "size" and isinstance(out, int):
            return self.size_int(out, lambda: self.graph.call_method("size", self.arg(tuple(args)), self.arg(kwargs)))
        if name == "numel" and isinstance(out, int):
            return self.size_int(out, lambda: self.graph.call_method("numel", (x,)))
        return out

    def call_module(self, call: Callable, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        name = self.names.get(id(module))
        if self.suspended or name is None or not self.is_leaf(module):
            return call(module, *args, **kwargs)
        self.suspended += 1
        try:
            out = call(module, *args, **kwargs)
        finally:
            self.suspended -= 1
        node = self.graph.call_module(name, self.arg(tuple(args)), self.arg(kwargs))
        self.outputs(node, out)
        return out


def eager_trace(model: nn.Module, args: tuple, kwargs: dict, is_leaf: Callable[[nn.Module], bool]) -> fx.Graph:
    """Run ``model(*args, **kwargs)`` once (eval mode, no gradients, no key/value cache) and return the
    operations it ran as a straight-line ``fx.Graph``; ``is_leaf(module)`` says which layers are kept
    whole."""
    recorder = _Recorder(model, is_leaf)
    for i, value in enumerate(args):
        recorder.outputs(recorder.graph.placeholder(f"arg{i}"), value)
    for key, value in kwargs.items():
        recorder.outputs(recorder.graph.placeholder(key), value)
    original_call = nn.Module.__call__

    def call(module, *a, **kw):
        return recorder.call_module(original_call, module, a, kw)

    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    with eval_mode(model):
        nn.Module.__call__ = call
        try:
            if cache:
                config.use_cache = False  # a cache would be filled again when the graph is run
            with torch.no_grad(), recorder:
                out = model(*args, **kwargs)
        finally:
            nn.Module.__call__ = original_call
            if cache:
                config.use_cache = cache
    if isinstance(out, Mapping):  # transformers' ModelOutput
        out = {k: v for k, v in out.items() if v is not None}
    recorder.graph.output(recorder.arg(out))
    return recorder.graph
