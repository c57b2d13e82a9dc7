"""Turning sparsity into milliseconds: sparse-kernel inference on the CPU, and ONNX export.

* :func:`plan_sparsity` measures, layer by layer and on this machine, whether a sparse kernel
  (``torch.sparse`` CSR, or BSR when the zeros come in blocks) computes a Linear or Conv2d layer faster
  than the dense one, with the layer's real input (captured with hooks while ``example_inputs`` run
  through the model). It changes nothing and returns a :class:`SparsifyPlan`.
* :func:`sparsify` applies a plan (measuring one first if none is given): it replaces only the layers
  measured faster by :class:`SparseLinear` / :class:`SparseConv2d`, so the result is never slower than
  the dense model; it then checks the whole model's outputs against the masked model's and its latency
  against the dense latency (and gives the dense model back, with a warning, should it not be faster).
  The sparse modules are for inference: their weights are buffers, not parameters.
* :func:`to_onnx` exports a masked (baked in on a copy), finalized or physically pruned model to ONNX
  (``pip install "prunekit[onnx]"``); :func:`run_onnx` runs a file with onnxruntime.

Convolutions are computed as ``unfold`` (im2col) followed by a sparse matrix product: the unfold copy
costs about as much as a dense convolution at batch 1, so they only pay at very high sparsity, and the
measurement decides. Grouped, transposed, 1-D/3-D convolutions and ``padding="same"`` stay dense.

    plan = pk.export.plan_sparsity(model, example)     # measure; print(plan) shows every layer
    fast = pk.export.sparsify(model, example, plan=plan)
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import masking
from ._format import format_ratio, format_seconds
from .modules import Inputs, call_model, fraction_pruned, matches, replace_module

__all__ = [
    "SparseLinear",
    "SparseConv2d",
    "LayerDecision",
    "SparsifyPlan",
    "plan_sparsity",
    "sparsify",
    "sparse_layers",
    "to_onnx",
    "run_onnx",
    "LAYOUTS",
]

LAYOUTS = ("csr", "bsr")
_BLOCK_SIZES = (32, 16, 8, 4)
_MIN_BLOCK_FILL = 0.5  # BSR is tried when the non-zero blocks are at least half full


# --- sparse modules -----------------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    """torch warns once per process that sparse CSR/BSR support is in beta; we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        yield


class _SparseMatrix(nn.Module):
    """A sparse ``(rows, cols)`` weight kept as plain buffers (``crow_indices``, ``col_indices``,
    ``values``: state_dict, deepcopy and ``.to()`` work as usual); the ``torch.sparse`` tensor is built
    from them once and cached."""

    def _store(self, matrix: Tensor, layout: str, blocksize: int | None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown sparse layout {layout!r} (known: {', '.join(LAYOUTS)})")
        matrix = matrix.detach()
        if layout == "bsr" and (not blocksize or matrix.shape[0] % blocksize or matrix.shape[1] % blocksize):
            raise ValueError(f"BSR needs a block size dividing the weight's shape {tuple(matrix.shape)}")
        with _quiet():
            sparse = matrix.to_sparse_csr() if layout == "csr" else matrix.to_sparse_bsr((blocksize, blocksize))
        index = torch.int32 if sparse.values().numel() < 2**31 else torch.int64  # int32: faster kernels
        self.register_buffer("crow_indices", sparse.crow_indices().to(index))
        self.register_buffer("col_indices", sparse.col_indices().to(index))
        self.register_buffer("values", sparse.values().contiguous())
        self.layout = layout
        self.blocksize = blocksize
        self.matrix_shape = tuple(matrix.shape)
        self.dense_s: float | None = None  # measured times, filled in by sparsify
        self.sparse_s: float | None = None
        self._cached: tuple[tuple, Tensor] | None = None

    @property
    def nnz(self) -> int:
        """Non-zero weights (BSR blocks may also store zeros)."""
        return int(torch.count_nonzero(self.values))

    def sparse_weight(self) -> Tensor:
        """The weight as a ``torch.sparse`` CSR/BSR tensor (rebuilt only when the buffers change)."""
        parts = (self.crow_indices, self.col_indices, self.values)
        key = tuple((t.data_ptr(), t.device, t.dtype, tuple(t.shape)) for t in parts)
        if self._cached is None or self._cached[0] != key:
            build = torch.sparse_csr_tensor if self.layout == "csr" else torch.sparse_bsr_tensor
            with _quiet():
                tensor = build(self.crow_indices, self.col_indices, self.values, self.matrix_shape,
                               check_invariants=False)
            self._cached = (key, tensor)
        return self._cached[1]

    def _matmul(self, columns: Tensor, bias: Tensor | None) -> Tensor:
        """``weight @ columns (+ bias[:, None])`` for a ``(cols, n)`` dense matrix."""
        weight = self.sparse_weight()
        if columns.shape[1] == 1 and self.layout == "csr":  # matrix-vector: a faster kernel
            vector = columns[:, 0]
            out = torch.addmv(bias, weight, vector) if bias is not None else torch.mv(weight, vector)
            return out.unsqueeze(1)
        if bias is not None:
            return torch.addmm(bias.unsqueeze(1), weight, columns)
        return torch.mm(weight, columns)

    def __getstate__(self) -> dict:  # deepcopy/pickle: sparse tensors have no storage to copy
        state = self.__dict__.copy()
        state["_cached"] = None
        return state

    def _measured(self) -> str:
        if self.dense_s and self.sparse_s:
            return f", measured {self.dense_s / self.sparse_s:.2f}x faster"
        return ""


class SparseLinear(_SparseMatrix):
    """``nn.Linear`` computed with a sparse weight (CSR or BSR): ``y = x @ W.T + b`` for any leading
    dimensions of ``x``. Build it with :meth:`from_dense`."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, layout: str = "csr",
                 blocksize: int | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._store(weight, layout, blocksize)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(cls, linear: nn.Linear, layout: str = "csr", blocksize: int | None = None) -> SparseLinear:
        """The sparse version of a Linear layer (its effective weight: a mask is applied)."""
        return cls(linear.weight, linear.bias, layout, blocksize)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        columns = x.reshape(-1, self.in_features).t()
        return self._matmul(columns, self.bias).t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        block = f" {self.blocksize}x{self.blocksize}" if self.layout == "bsr" else ""
        density = self.nnz / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.layout}{block}, density={density:.3f}{self._measured()}")


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def conv_unsupported(conv: nn.Module) -> str | None:
    """Why a convolution cannot be computed by :class:`SparseConv2d` (``None`` when it can)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not supported (Conv2d only)"
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str) and conv.padding != "valid":
        return f"padding={conv.padding!r}"
    return None


class SparseConv2d(_SparseMatrix):
    """``nn.Conv2d`` (groups=1, zero padding) as ``unfold`` (im2col) and a sparse matrix product with
    the ``(out_channels, in_channels * kh * kw)`` weight. Build it with :meth:`from_dense`."""

    def __init__(self, conv: nn.Conv2d, layout: str = "csr", blocksize: int | None = None) -> None:
        super().__init__()
        reason = conv_unsupported(conv)
        if reason is not None:
            raise ValueError(f"SparseConv2d cannot compute this convolution: {reason}")
        weight = conv.weight
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = _pair(conv.kernel_size)
        self.stride, self.dilation = _pair(conv.stride), _pair(conv.dilation)
        self.padding = (0, 0) if conv.padding == "valid" else _pair(conv.padding)
        self._store(weight.reshape(weight.shape[0], -1), layout, blocksize)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, layout: str = "csr", blocksize: int | None = None) -> SparseConv2d:
        return cls(conv, layout, blocksize)

    def _out_size(self, size: int, i: int) -> int:
        k, s, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
        return (size + 2 * p - d * (k - 1) - 1) // s + 1

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (n, c*k*k, L)
        # one sparse product per example: a single product with all n * L columns would need a transposed
        # copy of cols, and the sparse kernel is much slower on such wide matrices (cache misses)
        out = cols.new_empty(n, self.out_channels, cols.shape[2])
        weight = self.sparse_weight()
        for i in range(n):
            if self.bias is not None:
                torch.addmm(self.bias.unsqueeze(1), weight, cols[i], out=out[i])
            else:
                torch.mm(weight, cols[i], out=out[i])
        out = out.view(n, self.out_channels, self._out_size(h, 0), self._out_size(w, 1))
        return out[0] if unbatched else out

    def extra_repr(self) -> str:
        density = self.nnz / math.prod(self.matrix_shape)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"layout={self.layout}, density={density:.3f}{self._measured()}")


SPARSE_MODULES = (SparseLinear, SparseConv2d)


def sparse_layers(model: nn.Module) -> dict[str, _SparseMatrix]:
    """The sparse modules of a model, by name (what :func:`sparsify` converted)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SPARSE_MODULES)}


def _to_sparse(module: nn.Module, layout: str, blocksize: int | None) -> _SparseMatrix:
    if isinstance(module, nn.Linear):
        return SparseLinear.from_dense(module, layout, blocksize)
    return SparseConv2d.from_dense(module, layout, blocksize)


# --- measuring ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(first: Callable[[], Any], second: Callable[[], Any], repeats: int = 15, warmup: int = 3,
              device: torch.device = torch.device("cpu"),
              before: tuple[Callable[[], Any], Callable[[], Any]] | None = None,
              give_up: float | None = None, stat: str = "min") -> tuple[float, float]:
    """Seconds per call of two functions, measured interleaved (so both see the same machine load); each
    sample runs enough calls to last about two milliseconds. ``stat="min"`` (the default) keeps the best
    sample of each, which machine load (it only ever adds time) disturbs least; ``"median"`` the middle
    one. ``before`` gives two untimed set-up functions, run before each sample of the first and
    the second function. With ``give_up``, the measurement stops after three samples each when the second
    is already that many times slower."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    setup = before or (lambda: None, lambda: None)
    for _ in range(warmup):
        setup[0](), first(), setup[1](), second()
    _sync(device)
    setup[0]()
    start = time.perf_counter()
    first()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, min(1000, int(2e-3 / once)))
    samples: tuple[list[float], list[float]] = ([], [])
    for r in range(repeats):
        order = ((0, first), (1, second)) if r % 2 == 0 else ((1, second), (0, first))
        for slot, fn in order:
            setup[slot]()
            _sync(device)
            start = time.perf_counter()
            for _ in range(number):
                fn()
            _sync(device)
            samples[slot].append((time.perf_counter() - start) / number)
        if give_up is not None and r == 2 and statistics.median(samples[1]) > give_up * statistics.median(samples[0]):
            break
    reduce = statistics.median if stat == "median" else min
    return reduce(samples[0]), reduce(samples[1])


def _block_candidates(weight: Tensor) -> list[int]:
    """Block sizes whose non-zero blocks are at least half full (zeros that come in blocks)."""
    matrix = weight.reshape(weight.shape[0], -1)
    nonzero = matrix != 0
    nnz = int(nonzero.count_nonzero())
    found = []
    for b in _BLOCK_SIZES:
        rows, cols = matrix.shape
        if rows % b or cols % b or nnz == 0:
            continue
        blocks = nonzero.reshape(rows // b, b, cols // b, b).any(dim=3).any(dim=1)
        if nnz / (int(blocks.count_nonzero()) * b * b) >= _MIN_BLOCK_FILL:
            found.append(b)
    return found


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal within float32 rounding of differently ordered sums."""
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


# --- the plan -----------------------------------------------------------------------------------


@dataclass
class LayerDecision:
    """What :func:`plan_sparsity` found for one layer."""

    name: str
    kind: str  # "Linear" or "Conv2d"
    shape: tuple[int, ...]  # of the weight
    input_shape: tuple[int, ...] | None  # as the layer saw it with example_inputs
    sparsity: float  # fraction of zero weights
    dense_s: float | None = None  # seconds per call, dense (best of interleaved samples)
    sparse_s: float | None = None  # seconds per call, best sparse kernel
    layout: str | None = None  # "csr" or "bsr 16x16"
    convert: bool = False
    reason: str = ""
    measured: dict[str, float] = field(default_factory=dict)  # every sparse kernel tried: seconds per call

    @property
    def speedup(self) -> float | None:
        return self.dense_s / self.sparse_s if self.dense_s and self.sparse_s else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


@dataclass
class SparsifyPlan:
    """Per-layer measurements and decisions; ``str(plan)`` is a table. :func:`sparsify` fills in the
    whole model's latencies (``model_dense_s``, ``model_sparse_s``) when it applies the plan."""

    layers: list[LayerDecision]
    threads: int
    min_speedup: float
    model_dense_s: float | None = None
    model_sparse_s: float | None = None
    reverted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def converted(self) -> list[str]:
        return [d.name for d in self.layers if d.convert]

    @property
    def speedup(self) -> float | None:
        """Whole-model speedup measured by :func:`sparsify` (``None`` before)."""
        if self.model_dense_s and self.model_sparse_s:
            return self.model_dense_s / self.model_sparse_s
        return None

    def rows(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "min_speedup": self.min_speedup, "model_dense_s": self.model_dense_s,
                "model_sparse_s": self.model_sparse_s, "speedup": self.speedup, "reverted": self.reverted,
                "layers": self.rows()}

    def __str__(self) -> str:
        lines = [f"{'layer':<24} {'sparsity':>8} {'dense':>9} {'sparse':>9} {'speedup':>7}  decision"]
        for d in self.layers:
            decision = f"sparse ({d.layout})" if d.convert else f"dense: {d.reason}"
            dense, sparse = format_seconds(d.dense_s), format_seconds(d.sparse_s)
            lines.append(f"{d.name:<24} {d.sparsity:>8.1%} {dense:>9} {sparse:>9} {format_ratio(d.speedup, 2):>7}  {decision}")
        if self.speedup is not None:
            lines.append(f"whole model: {format_seconds(self.model_dense_s)} dense, "
                         f"{format_seconds(self.model_sparse_s)} "
                         f"sparse, {format_ratio(self.speedup, 2)}" + (" (reverted to dense)" if self.reverted else ""))
        return "\n".join(lines)


def _candidates(model: nn.Module, targets: Iterable[str] | None, exclude: Iterable[str]) -> list[tuple[str, nn.Module]]:
    targets = [targets] if isinstance(targets, str) else (None if targets is None else list(targets))
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    found, used = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        if targets is not None:
            hits = [p for p in targets if matches(name, p)]
            if not hits:
                continue
            used.update(hits)
        if any(matches(name, p) for p in exclude):
            continue
        found.append((name, module))
    if targets is not None:
        unused = [p for p in targets if p not in used]
        if unused:
            raise ValueError(f"targets {', '.join(map(repr, unused))} match no Linear or convolution of the model")
    return found


def _capture_inputs(model: nn.Module, modules: Sequence[tuple[str, nn.Module]], example_inputs: Inputs) -> dict[str, Tensor]:
    captured: dict[str, Tensor] = {}
    handles = []
    for name, module in modules:
        def hook(_module, args, name=name):
            if name not in captured and args and isinstance(args[0], Tensor):
                captured[name] = args[0].detach().clone()
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _check_options(min_sparsity: float, min_speedup: float, layouts: Sequence[str], repeats: int) -> None:
    if not 0.0 <= min_sparsity < 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1), got {min_sparsity!r}")
    if not min_speedup >= 1.0:
        raise ValueError(f"min_speedup must be at least 1.0 (never slower than dense), got {min_speedup!r}")
    bad = [layout for layout in layouts if layout not in LAYOUTS]
    if bad or not layouts:
        raise ValueError(f"layouts must be some of {LAYOUTS}, got {tuple(layouts)!r}")
    if repeats < 3:
        raise ValueError(f"repeats must be at least 3, got {repeats}")


def _baked(model: nn.Module) -> nn.Module:
    """An eval-mode copy with masks baked into the weights."""
    work = copy.deepcopy(model)
    masking.finalize(work)
    return work.eval()


def plan_sparsity(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    targets: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str = (),
    min_sparsity: float = 0.5,
    min_speedup: float = 1.1,
    layouts: Sequence[str] = LAYOUTS,
    repeats: int = 15,
    warmup: int = 3,
    threads: int | None = None,
) -> SparsifyPlan:
    """Measure, for every Linear and Conv2d layer, the dense layer against its sparse versions on the
    input it receives from ``example_inputs``; nothing is changed.

    Args:
        targets, exclude: module names or globs to consider / leave alone (default: every Linear and conv).
        min_sparsity: layers with fewer zeros than this are not measured (sparse kernels lose there).
        min_speedup: a layer is converted only when its best sparse kernel is at least this many times
            faster than the dense layer (1.1 leaves a margin against timing noise).
        layouts: sparse layouts to try: ``"csr"``, and ``"bsr"`` for weights whose zeros come in blocks.
        repeats, warmup: timing samples per kernel (interleaved with the dense layer's; the best of each
            is compared) and untimed runs.
        threads: torch threads while measuring (default: the current setting). Measure with the number
            of threads the model will be served with.
    """
    _check_options(min_sparsity, min_speedup, layouts, repeats)
    work = _baked(model)
    modules = _candidates(work, targets, exclude)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        inputs = _capture_inputs(work, modules, example_inputs)
        decisions = [
            _decide(name, module, inputs.get(name), min_sparsity, min_speedup, layouts, repeats, warmup)
            for name, module in modules
        ]
        return SparsifyPlan(decisions, torch.get_num_threads(), min_speedup)
    finally:
        torch.set_num_threads(previous)


def _decide(name: str, module: nn.Module, x: Tensor | None, min_sparsity: float, min_speedup: float,
            layouts: Sequence[str], repeats: int, warmup: int) -> LayerDecision:
    weight = module.weight.detach()
    sparsity = fraction_pruned(weight)  # the fraction of zero weights
    decision = LayerDecision(name, type(module).__name__, tuple(weight.shape),
                             None if x is None else tuple(x.shape), sparsity)
    reason = None if isinstance(module, nn.Linear) else conv_unsupported(module)
    if reason is not None:
        decision.reason = reason
        return decision
    if x is None:
        decision.reason = "not called by example_inputs"
        return decision
    if sparsity < min_sparsity:
        decision.reason = f"sparsity below min_sparsity={min_sparsity:g}"
        return decision
    options = [("csr", None)] if "csr" in layouts else []
    if "bsr" in layouts:
        options += [("bsr", b) for b in _block_candidates(weight)]
    with torch.inference_mode():
        reference = module(x)
        best, failures = None, []
        for layout, blocksize in options:
            try:
                sparse = _to_sparse(module, layout, blocksize)
                agrees = _close(sparse(x), reference)
            except (RuntimeError, NotImplementedError) as error:  # e.g. no sparse kernel for this dtype
                failures.append(f"{layout}: {str(error).splitlines()[0][:120]}")
                continue
            if not agrees:
                failures.append(f"{layout}: output differs from the dense layer")
                continue  # never happens with a correct kernel; a wrong one is never used
            dense_s, sparse_s = time_pair(lambda: module(x), lambda: sparse(x), repeats, warmup, x.device,
                                          give_up=2.0 * min_speedup)
            label = layout if blocksize is None else f"bsr {blocksize}x{blocksize}"
            decision.measured[label] = sparse_s
            if best is None or sparse_s / dense_s < best[1] / best[0]:
                best = (dense_s, sparse_s, label)
    if best is None:
        decision.reason = "no sparse kernel could be used (" + "; ".join(failures) + ")"
        return decision
    decision.dense_s, decision.sparse_s, decision.layout = best
    if decision.speedup >= min_speedup:
        decision.convert, decision.reason = True, "faster"
    else:
        decision.reason = f"sparse kernel not faster ({decision.speedup:.2f}x < {min_speedup:g}x)"
    return decision


def sparsify(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    plan: SparsifyPlan | None = None,
    inplace: bool = False,
    verify: bool = True,
    **options: Any,
) -> nn.Module:
    """A model whose Linear / Conv2d layers that a sparse kernel computes faster (measured on this
    machine, see :func:`plan_sparsity`) are replaced by :class:`SparseLinear` / :class:`SparseConv2d`.

    Masks are baked in (a masked model computes exactly what its finalized version computes), the
    result is in eval mode and meant for inference. ``model`` itself is left as it is unless
    ``inplace=True``. ``plan`` applies an earlier :func:`plan_sparsity` (then ``options`` are not used;
    otherwise they are passed to it). With ``verify`` (the default), the whole model's outputs are
    checked against the masked model's (float32 tolerance; a mismatch raises ``RuntimeError``), and its
    latency against the dense latency: should the sparse model not be faster as a whole, the dense
    layers are put back, with a warning. The plan records both latencies.
    """
    if plan is None:
        plan = plan_sparsity(model, example_inputs, **options)
    elif options:
        raise TypeError(f"options {', '.join(options)} are for plan_sparsity; with plan= they would be ignored")
    if inplace:
        masking.finalize(model)
        work = model.eval()
    else:
        work = _baked(model)
    replaced = []
    for decision in plan.layers:
        if not decision.convert:
            continue
        try:
            dense = work.get_submodule(decision.name)
        except AttributeError:
            raise ValueError(f"the plan names layer {decision.name!r}, which this model does not have") from None
        layout, _, block = decision.layout.partition(" ")
        blocksize = int(block.split("x")[0]) if block else None
        sparse = _to_sparse(dense, layout, blocksize)
        sparse.dense_s, sparse.sparse_s = decision.dense_s, decision.sparse_s
        replaced.append((decision.name, replace_module(work, decision.name, sparse)))
    if verify and replaced:
        _verify(work, replaced, example_inputs, plan)
    return work


def _verify(work: nn.Module, replaced: list[tuple[str, nn.Module]], example_inputs: Inputs, plan: SparsifyPlan) -> None:
    """Outputs and whole-model latency, sparse against dense: the converted layers are swapped in and
    out of the same model (no copy), outside the timed calls."""
    sparse_modules = [(name, work.get_submodule(name)) for name, _ in replaced]

    def use(modules):
        return lambda: [replace_module(work, name, module) for name, module in modules]

    use_dense, use_sparse = use(replaced), use(sparse_modules)
    previous = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        with torch.inference_mode():
            use_dense()
            expected = _flat_tensors(call_model(work, example_inputs))
            use_sparse()
            got = _flat_tensors(call_model(work, example_inputs))
            for a, b in zip(got, expected):
                if not _close(a, b):
                    raise RuntimeError("sparsify: the sparse model's output differs from the dense model's by "
                                       f"{float((a - b).abs().max()):.3g}")
            device = expected[0].device if expected else torch.device("cpu")
            run = lambda: call_model(work, example_inputs)  # noqa: E731
            plan.model_dense_s, plan.model_sparse_s = time_pair(
                run, run, device=device, before=(use_dense, use_sparse))
            use_sparse()
    finally:
        torch.set_num_threads(previous)
    if plan.model_sparse_s > plan.model_dense_s:
        use_dense()
        plan.reverted = True
        warnings.warn(
            f"sparsify: the sparse model measured slower than the dense one as a whole "
            f"({plan.model_sparse_s * 1e3:.3g} ms vs {plan.model_dense_s * 1e3:.3g} ms); the dense layers are kept",
            stacklevel=3,
        )


def _flat_tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    return [getattr(value, k) for k in ("logits", "last_hidden_state") if isinstance(getattr(value, k, None), Tensor)]


# --- ONNX ---------------------------------------------------------------------------------------


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as error:
        raise ImportError(f'ONNX export needs onnx and onnxruntime ({error}); pip install "prunekit[onnx]"') from None


def _as_tuple(example_inputs: Inputs) -> tuple:
    if isinstance(example_inputs, dict):
        raise TypeError("to_onnx takes example_inputs as a tensor or a tuple of tensors, not a dict")
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def to_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] = ("output",),
    dynamic_batch: bool = True,
    opset_version: int | None = None,
    dynamo: bool = False,
) -> Path:
    """Export ``model`` to an ONNX file and return its path.

    A masked model is exported from a copy with its masks baked in (``model`` is not changed), so the
    pruned weights are stored as zeros; a physically pruned model (``prunekit.structured``) exports
    with its smaller shapes, so the file shrinks with it. Models converted by :func:`sparsify` cannot
    be exported (ONNX Runtime has no such sparse kernels): export the model before sparsifying it.
    ``dynamic_batch`` makes the first dimension of every input and output symbolic. ``dynamo=True``
    uses torch's newer exporter (slower; weights may go to a ``.data`` file next to the model).
    """
    _require_onnx()
    converted = sparse_layers(model)
    if converted:
        raise ValueError(f"{', '.join(converted)} are sparse-kernel layers from sparsify(), which ONNX cannot "
                         "express: export the model before sparsify()")
    args = _as_tuple(example_inputs)
    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    names = list(input_names) if input_names is not None else (
        ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
    if len(names) != len(args):
        raise ValueError(f"{len(names)} input names for {len(args)} inputs")
    work = _baked(model)
    kwargs: dict[str, Any] = {"input_names": names, "output_names": list(output_names)}
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    if dynamic_batch:
        if dynamo:
            kwargs["dynamic_shapes"] = tuple({0: torch.export.Dim("batch")} for _ in args)
        else:
            kwargs["dynamic_axes"] = {n: {0: "batch"} for n in [*names, *output_names]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(work, args, str(path), dynamo=dynamo, **kwargs)
    return path


def run_onnx(path: str | Path, example_inputs: Inputs) -> list:
    """Run an ONNX file with onnxruntime (CPU) on ``example_inputs``; returns the outputs (numpy arrays)."""
    _require_onnx()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args = _as_tuple(example_inputs)
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    return session.run(None, feeds)
