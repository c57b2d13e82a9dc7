"""pk.export.to_onnx: masked, finalized and physically pruned models export; onnxruntime agrees."""

import copy
import importlib

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import export, metrics
from prunekit.models import LeNet5

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_onnx_matches(model: nn.Module, path, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = export.run_onnx(path, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_masked_model_exports_with_masks_baked_in(tmp_path):
    model = LeNet5()
    pk.prune(model, 0.9, scope="local")
    masks_before = {k: v.clone() for k, v in pk.masks(model).items()}
    path = export.to_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "lenet.onnx")
    assert set(pk.masks(model)) == set(masks_before)  # the model keeps its masks
    assert all(torch.equal(pk.masks(model)[k], m) for k, m in masks_before.items())
    for batch in (1, 2, 5):  # the batch dimension is dynamic
        assert_onnx_matches(model, path, torch.randn(batch, 1, 8, 8))

    import onnx
    from onnx import numpy_helper

    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    fc1 = next(v for k, v in stored.items() if v.shape == tuple(model.fc1.weight.shape))
    assert np.array_equal(fc1 == 0, ~pk.masks(model)["fc1.weight"].numpy())  # pruned weights stored as zeros


def test_finalized_model_exports_and_matches(tmp_path):
    model = LeNet5()
    pk.prune(model, 0.8, scope="local")
    pk.finalize(model)
    path = export.to_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "final.onnx")
    assert_onnx_matches(model, path, torch.randn(4, 1, 8, 8))


def narrow_by_hand(model: nn.Sequential, keep: float) -> nn.Sequential:
    """Physically remove the hidden neurons of lowest L1 norm (what structured pruning does), keeping
    ``keep`` of each hidden layer: rows of a layer and the matching columns of the next go together."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    new, previous_keep = [], None
    for i, layer in enumerate(layers):
        weight, bias = layer.weight.detach(), layer.bias.detach()
        if previous_keep is not None:
            weight = weight[:, previous_keep]
        if i < len(layers) - 1:
            rows = weight.abs().sum(dim=1).topk(int(keep * weight.shape[0])).indices.sort().values
            weight, bias, previous_keep = weight[rows], bias[rows], rows
        else:
            previous_keep = None
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight), linear.bias.copy_(bias)
        new.append(linear)
    out = []
    for linear in new[:-1]:
        out += [linear, nn.ReLU()]
    return nn.Sequential(*out, new[-1])


def structurally_pruned(model: nn.Sequential, x: torch.Tensor, keep: float) -> tuple[nn.Module, str]:
    """``prunekit.structured.prune`` when it exists, otherwise the same surgery by hand."""
    try:
        structured = importlib.import_module("prunekit.structured")
    except ImportError:
        structured = None
    if structured is not None and hasattr(structured, "prune"):
        pruned = copy.deepcopy(model)
        result = structured.prune(pruned, x, ratio=1 - keep, method="l1", scope="local")
        return (result if isinstance(result, nn.Module) else pruned), "prunekit.structured.prune"
    return narrow_by_hand(model, keep), "by hand"


def test_structurally_pruned_model_file_shrinks_by_the_parameter_ratio(tmp_path):
    dense = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(3, 64)
    narrow, how = structurally_pruned(dense, x, keep=0.5)
    ratio = params(narrow) / params(dense)
    assert ratio < 0.5, how  # hidden widths halved: the middle layer keeps a quarter
    dense_file = export.to_onnx(dense, x, tmp_path / "dense.onnx")
    narrow_file = export.to_onnx(narrow, x, tmp_path / "narrow.onnx")
    assert metrics.file_size(narrow_file) / metrics.file_size(dense_file) == pytest.approx(ratio, rel=0.10)
    assert_onnx_matches(narrow, narrow_file, torch.randn(7, 64))


def test_sparsified_models_cannot_be_exported(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8))
    pk.prune(model, 0.9)
    plan = export.plan_sparsity(model, torch.randn(1, 8), repeats=3)
    plan.layers[0].convert, plan.layers[0].layout = True, "csr"
    fast = export.sparsify(model, torch.randn(1, 8), plan=plan, verify=False)
    with pytest.raises(ValueError, match="export the model before sparsify"):
        export.to_onnx(fast, torch.randn(1, 8), tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="not a dict"):
        export.to_onnx(model, {"x": torch.randn(1, 8)}, tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        export.to_onnx(model, torch.randn(1, 8), tmp_path / "missing" / "x.onnx")


def test_structurally_pruned_convnet_exports_and_matches(tmp_path):
    structured = pytest.importorskip("prunekit.structured", reason="prunekit.structured is not available")
    model = LeNet5()
    x = torch.randn(2, 1, 8, 8)
    dense_file = export.to_onnx(model, x, tmp_path / "dense.onnx")
    before = params(model)
    structured.prune(model, x, ratio=0.5, method="l1", scope="local")
    ratio = params(model) / before
    assert ratio < 0.6
    narrow_file = export.to_onnx(model, x, tmp_path / "narrow.onnx")
    assert metrics.file_size(narrow_file) / metrics.file_size(dense_file) == pytest.approx(ratio, rel=0.10)
    assert_onnx_matches(model, narrow_file, torch.randn(5, 1, 8, 8))
