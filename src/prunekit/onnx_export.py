"""ONNX export of a pruned model, and running the file with onnxruntime (``pip install "prunekit[onnx]"``)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import masking
from .modules import Inputs
from .sparse_modules import sparse_layers

__all__ = ["to_onnx", "run_onnx", "baked_copy"]


def baked_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with its masks baked into the weights (what is exported)."""
    work = copy.deepcopy(model)
    masking.finalize(work)
    return work.eval()


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
    work = baked_copy(model)
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
