"""pk.export.sparsify: sparse kernels where they are measured faster, outputs equal to the masked model's."""

import copy
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import export
from prunekit.export import SparseConv2d, SparseLinear


def sparse_weight(shape, sparsity, generator=None):
    w = torch.randn(shape, generator=generator)
    return w * (torch.rand(shape, generator=generator) >= sparsity)


def close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# --- the sparse modules compute what the dense layers compute ---------------------------------


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 3, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_linear(shape, bias):
    layer = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(sparse_weight((48, 64), 0.8))
    sparse = SparseLinear.from_dense(layer)
    x = torch.randn(shape)
    assert sparse.nnz == int(torch.count_nonzero(layer.weight))
    out = sparse(x)
    assert out.shape == (*shape[:-1], 48)
    assert close(out, layer(x))


def test_sparse_linear_bsr_matches_linear_on_block_sparse_weights():
    keep = (torch.rand(6, 4) > 0.6).repeat_interleave(8, 0).repeat_interleave(8, 1)  # 8x8 blocks
    layer = nn.Linear(32, 48)
    with torch.no_grad():
        layer.weight.mul_(keep)
    assert 8 in export._block_candidates(layer.weight)
    assert export._block_candidates(sparse_weight((48, 32), 0.8)) == []  # scattered zeros: no blocks
    sparse = SparseLinear.from_dense(layer, layout="bsr", blocksize=8)
    x = torch.randn(7, 32)
    assert close(sparse(x), layer(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, padding=1, bias=False),
        dict(kernel_size=(3, 5), stride=2, padding=(1, 2)),
        dict(kernel_size=3, dilation=2, padding="valid"),
        dict(kernel_size=1),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_conv_matches_conv(kwargs, batch):
    conv = nn.Conv2d(4, 8, **kwargs)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.7)
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(batch, 4, 11, 12)
    assert close(sparse(x), conv(x))
    assert close(sparse(x[0]), conv(x[0]))  # unbatched input


def test_unsupported_convolutions_are_named():
    assert "groups=2" in export.conv_unsupported(nn.Conv2d(4, 8, 3, groups=2))
    assert "padding='same'" in export.conv_unsupported(nn.Conv2d(4, 8, 3, padding="same"))
    assert "reflect" in export.conv_unsupported(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"))
    assert "Conv1d" in export.conv_unsupported(nn.Conv1d(4, 8, 3))
    with pytest.raises(ValueError, match="groups=2"):
        SparseConv2d.from_dense(nn.Conv2d(4, 8, 3, groups=2))


def test_sparse_modules_survive_deepcopy_and_state_dict():
    layer = nn.Linear(16, 8)
    sparse = SparseLinear.from_dense(layer)
    x = torch.randn(2, 16)
    sparse(x)  # builds the cached sparse tensor
    twin = copy.deepcopy(sparse)
    assert close(twin(x), layer(x))
    fresh = SparseLinear(torch.ones(8, 16), torch.zeros(8))
    fresh(x)  # cached before the load
    fresh.load_state_dict(sparse.state_dict())
    assert close(fresh(x), layer(x))  # the cache follows the loaded buffers
    other = SparseLinear(sparse_weight((8, 16), 0.5), torch.zeros(8))
    fresh.crow_indices, fresh.col_indices, fresh.values = other.crow_indices, other.col_indices, other.values
    assert close(fresh(x), other(x) - other.bias + fresh.bias)  # buffers replaced: rebuilt


# --- sparsify ------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """One big layer that sparse kernels win by a wide margin at 99% (batch 32), one that they lose."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(1024, 1024)
        self.small = nn.Linear(1024, 256)

    def forward(self, x):
        return self.small(torch.relu(self.big(x)))


def mixed_pruned():
    model = Mixed()
    pk.prune(model, scope={"big": 0.99, "small": 0.1})
    return model


def test_sparsify_converts_what_pays_and_keeps_the_rest_dense():
    model = mixed_pruned()
    x = torch.randn(32, 1024)
    plan = export.plan_sparsity(model, x, min_sparsity=0.0, repeats=5)
    by_name = {d.name: d for d in plan.layers}
    assert by_name["big"].input_shape == (32, 1024) and by_name["small"].input_shape == (32, 1024)
    assert by_name["big"].sparsity == pytest.approx(0.99, abs=1e-3)
    # 99% sparse at batch 32: the sparse kernel is many times faster; 10% sparse: several times slower
    assert by_name["big"].convert and by_name["big"].layout == "csr"
    assert not by_name["small"].convert and "not faster" in by_name["small"].reason  # below break-even
    fast = export.sparsify(model, x, plan=plan)
    assert isinstance(fast.big, SparseLinear) and isinstance(fast.small, nn.Linear)
    assert set(export.sparse_layers(fast)) == {"big"}
    # the whole model was timed both ways, and kept sparse because it was faster
    assert not plan.reverted and plan.speedup == plan.model_dense_s / plan.model_sparse_s >= 1.0
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert pk.sparsity(model, per_layer=True)["big.weight"] == pytest.approx(0.99, abs=1e-3)  # untouched
    assert "big" in str(plan) and "sparse (csr)" in str(plan)


def test_layers_below_min_sparsity_are_not_measured():
    model = mixed_pruned()
    x = torch.randn(4, 1024)
    plan = export.plan_sparsity(model, x, targets=["small"], repeats=3)
    (only,) = plan.layers
    assert only.name == "small" and not only.convert and only.dense_s is None
    assert "below min_sparsity=0.5" in only.reason


def test_a_layer_forced_sparse_below_break_even_is_put_back():
    # A plan that claims the 10%-sparse layer pays: the whole-model check measures it slower and
    # keeps the dense layer, so the result is never slower than dense.
    model = mixed_pruned()
    x = torch.randn(32, 1024)
    plan = export.plan_sparsity(model, x, targets=["small"], min_sparsity=0.0, repeats=3)
    plan.layers[0].convert, plan.layers[0].layout = True, "csr"
    with pytest.warns(UserWarning, match="slower than the dense one"):
        fast = export.sparsify(model, x, plan=plan)
    assert plan.reverted and isinstance(fast.small, nn.Linear)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_sparsify_masked_and_finalized_models_alike_and_inplace():
    model = mixed_pruned()
    x = torch.randn(32, 1024)
    finalized = pk.finalize(copy.deepcopy(model))
    a = export.sparsify(model, x, targets=["big"], repeats=5)
    b = export.sparsify(finalized, x, targets=["big"], repeats=5, inplace=True)
    assert b is finalized and isinstance(b.big, SparseLinear)
    assert torch.equal(a.big.values, b.big.values) and torch.equal(a.big.col_indices, b.big.col_indices)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_layers_the_example_never_calls_stay_dense():
    class Partly(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    plan = export.plan_sparsity(Partly(), torch.randn(2, 8), min_sparsity=0.0, repeats=3)
    unused = next(d for d in plan.layers if d.name == "unused")
    assert unused.reason == "not called by example_inputs" and not unused.convert


def test_bad_options_raise_before_anything_runs():
    model = mixed_pruned()
    x = torch.randn(2, 1024)
    with pytest.raises(ValueError, match="'bigg'"):
        export.plan_sparsity(model, x, targets=["bigg"])
    with pytest.raises(ValueError, match="min_speedup must be at least 1.0"):
        export.plan_sparsity(model, x, min_speedup=0.9)
    with pytest.raises(ValueError, match="layouts must be some of"):
        export.plan_sparsity(model, x, layouts=("coo",))
    plan = export.plan_sparsity(model, x, targets=["big"], repeats=3)
    with pytest.raises(TypeError, match="repeats"):
        export.sparsify(model, x, plan=plan, repeats=3)
    plan.layers[0].convert, plan.layers[0].layout = True, "csr"
    with pytest.raises(ValueError, match="'big'"):
        export.sparsify(nn.Sequential(nn.Linear(1024, 10)), x, plan=plan)


def test_conv_models_are_measured_and_stay_correct():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=2), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, 10))
    pk.prune(model, 0.95, scope="local")
    x = torch.randn(1, 3, 8, 8)
    plan = export.plan_sparsity(model, x, repeats=3)
    reasons = {d.name: d.reason for d in plan.layers}
    assert reasons["2"] == "grouped convolution (groups=2)"
    assert plan.layers[0].dense_s > 0 and plan.layers[0].sparse_s > 0  # the plain conv was measured both ways
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a marginal conversion may be measured slower as a whole, and undone
        fast = export.sparsify(model, x, plan=plan)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_sparse_conv_is_used_when_forced_and_matches():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
    pk.prune(model, 0.9)
    x = torch.randn(2, 3, 8, 8)
    plan = export.plan_sparsity(model, x, repeats=3)
    plan.layers[0].convert, plan.layers[0].layout = True, "csr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it may be measured slower and put back
        fast = export.sparsify(model, x, plan=plan, verify=False)
    assert isinstance(fast[0], SparseConv2d)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-5, atol=1e-5)


# --- the benchmark ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sparse_inference_benchmark_smoke_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_inference.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--no-conv", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "sparse_inference.md").read_text()
    assert "| 90% | 1 |" in table and "| 99% | 32 |" in table and "| 100x |" in table
    assert "Sparse outputs equal to dense (float32 tolerance) everywhere: **yes**" in table
    import json

    rows = json.loads((tmp_path / "sparse_inference.json").read_text())["linear"]
    assert [(r["sparsity"], r["batch"]) for r in rows] == [(0.9, 1), (0.9, 32), (0.99, 1), (0.99, 32)]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["dense_s"] / r["sparse_s"])
        assert r["sparsify"] == ("sparse" if r["speedup"] >= 1.1 else "dense")
        assert r["speedup_median"] == pytest.approx(r["dense_median_s"] / r["sparse_median_s"])


def test_block_sparse_weights_are_measured_with_bsr_too():
    layer = nn.Linear(256, 256)
    keep = (torch.rand(16, 16) > 0.9).repeat_interleave(16, 0).repeat_interleave(16, 1)  # 16x16 blocks
    with torch.no_grad():
        layer.weight.mul_(keep)
    model = nn.Sequential(layer)
    x = torch.randn(8, 256)
    (decision,) = export.plan_sparsity(model, x, repeats=3).layers
    assert {"csr", "bsr 16x16", "bsr 8x8", "bsr 4x4"} <= set(decision.measured)
    assert "bsr 32x32" not in decision.measured  # 32x32 blocks would be mostly empty
    assert decision.layout in decision.measured
    assert decision.sparse_s == decision.measured[decision.layout]
    plan = export.plan_sparsity(model, x, repeats=3, layouts=("bsr",))
    plan.layers[0].convert = True
    fast = export.sparsify(model, x, plan=plan, verify=False)
    assert fast[0].layout == "bsr" and fast[0].blocksize in (4, 8, 16)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_dtypes_without_a_sparse_kernel_stay_dense_with_the_reason():
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    pk.prune(model, 0.9)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    (decision,) = export.plan_sparsity(model, x, repeats=3).layers
    assert not decision.convert and decision.reason.startswith("no sparse kernel could be used (csr:")
    fast = export.sparsify(model, x, repeats=3)
    assert export.sparse_layers(fast) == {}
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
