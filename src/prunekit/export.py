"""Turning sparsity into milliseconds: measure sparse kernels layer by layer and swap in the faster ones.

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
  (``pip install "prunekit[onnx]"``); :func:`run_onnx` runs a file with onnxruntime. They live in
  :mod:`prunekit.onnx_export`, the sparse modules in :mod:`prunekit.sparse_modules`; both are
  re-exported here, where the public API has always had them (``pk.export.to_onnx``).

Convolutions are computed as ``unfold`` (im2col) followed by a sparse matrix product: the unfold copy
costs about as much as a dense convolution at batch 1, so they only pay at very high sparsity, and the
measurement decides. Grouped, transposed, 1-D/3-D convolutions and ``padding="same"`` stay dense.

    plan = pk.export.plan_sparsity(model, example)     # measure; print(plan) shows every layer
    fast = pk.export.sparsify(model, example, plan=plan)
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import masking
from ._format import format_ratio, format_seconds
from .modules import Inputs, call_model, fraction_pruned, matches, replace_module
from .onnx_export import baked_copy, run_onnx, to_onnx
from .sparse_modules import LAYOUTS, SparseConv2d, SparseLinear, conv_unsupported, sparse_layers, to_sparse

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

_BLOCK_SIZES = (32, 16, 8, 4)
_MIN_BLOCK_FILL = 0.5  # BSR is tried when the non-zero blocks are at least half full


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
    work = baked_copy(model)
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
                sparse = to_sparse(module, layout, blocksize)
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
        work = baked_copy(model)
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
        sparse = to_sparse(dense, layout, blocksize)
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
