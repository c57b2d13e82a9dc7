import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit import masking, metrics
from prunekit._format import format_bytes, format_count

torch.set_num_threads(1)


def half_mask(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Exactly half of the entries kept, at random positions."""
    n = torch.Size(shape).numel()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 2]] = True
    return mask.view(shape)


def reference_flops(model: nn.Module, inputs) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return counter.get_total_flops()


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 5, stride=2, padding=2, groups=4)
        self.conv3 = nn.Conv2d(16, 16, 3, groups=16, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv3(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class MatmulNet(nn.Module):
    """Attention-like: a weight matmul inside a layer and a matmul between activations outside layers."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.randn(d, d))

    def forward(self, x):
        q = self.proj(x)
        return torch.matmul(torch.matmul(q, self.scale), q.transpose(-1, -2))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- parameters ----------------------------------------------------------------------------------


def test_count_params_by_hand():
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))
    expected = (5 * 3 + 3) + (3 + 3) + 3 * 2
    # BatchNorm's bias starts at zero: exact zeros are not counted as non-zero (ShrinkBench's rule).
    assert metrics.count_params(model) == (expected, expected - 3)
    with torch.no_grad():
        model[1].bias.fill_(0.5)
    assert metrics.count_params(model) == (expected, expected)
    assert metrics.compression_ratio(model) == 1.0


def test_count_params_tied_counted_once():
    model = Tied()
    assert metrics.count_params(model) == (40, 40)
    masking.attach(model, "emb.weight", half_mask((10, 4)))
    assert metrics.count_params(model) == (40, 20)


def test_masked_entries_not_counted_and_ratio_exact():
    model = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6))
    nn.init.normal_(model[1].bias)
    total = 8 * 6 + 6 + 6 + 6
    masking.attach(model, "0.weight", half_mask((6, 8)))
    assert metrics.count_params(model) == (total, total - 24)
    assert metrics.compression_ratio(model) == total / (total - 24)
    masking.finalize(model)
    assert metrics.count_params(model) == (total, total - 24)


# --- FLOPs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, inputs",
    [
        (ConvNet, torch.randn(2, 3, 16, 16)),
        (mlp, torch.randn(4, 12)),
        (MatmulNet, torch.randn(3, 5, 8)),
    ],
)
def test_dense_flops_match_flop_counter(make, inputs):
    model = make()
    dense, remaining = metrics.flops(model, inputs)
    assert dense == reference_flops(model, inputs) > 0
    assert remaining == dense
    assert metrics.theoretical_speedup(model, inputs) == 1.0


def test_linear_and_conv_flops_by_hand():
    b, cin, cout, groups, k, stride, pad, h = 2, 8, 12, 4, 3, 2, 1, 9
    assert metrics.flops(nn.Linear(7, 5), torch.randn(b, 7))[0] == 2 * b * 7 * 5
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups)
    hout = (h + 2 * pad - k) // stride + 1
    assert metrics.flops(conv, torch.randn(b, cin, h, h))[0] == 2 * b * cout * hout * hout * (cin // groups) * k * k


def test_input_forms():
    model = MatmulNet()
    x = torch.randn(2, 4, 8)
    expected = metrics.flops(model, x)
    assert metrics.flops(model, (x,)) == expected
    assert metrics.flops(model, {"x": x}) == expected


@pytest.mark.parametrize("layer", ["conv1", "conv2", "fc"])
def test_half_mask_removes_half_of_layer_flops(layer):
    model, x = ConvNet(), torch.randn(2, 3, 16, 16)
    dense, _ = metrics.flops(model, x)
    layer_dense = metrics.flops(getattr(model, layer), _layer_input(model, layer, x))[0]
    weight = getattr(model, layer).weight
    masking.attach(model, f"{layer}.weight", half_mask(tuple(weight.shape)))
    dense_after, remaining = metrics.flops(model, x)
    assert dense_after == dense
    assert dense - remaining == layer_dense // 2
    assert metrics.theoretical_speedup(model, x) == dense / remaining
    masking.finalize(model)
    assert metrics.flops(model, x) == (dense, remaining)


def _layer_input(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = getattr(model, layer).register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    model.train()
    return captured["x"]


def test_ops_outside_layers_stay_dense():
    model, x = MatmulNet(d=8), torch.randn(3, 5, 8)
    dense, _ = metrics.flops(model, x)
    proj_flops = 2 * 15 * 8 * 8
    masking.attach(model, "proj.weight", half_mask((8, 8)))
    _, remaining = metrics.flops(model, x)
    # The module MatmulNet owns `scale` (dense), so the matmuls it runs itself keep their FLOPs.
    assert dense - remaining == proj_flops // 2


def test_fully_masked_model_has_infinite_speedup():
    model, x = nn.Linear(4, 4, bias=False), torch.randn(2, 4)
    masking.attach(model, "weight", torch.zeros(4, 4, dtype=torch.bool))
    assert metrics.flops(model, x)[1] == 0
    assert metrics.theoretical_speedup(model, x) == float("inf")
    assert metrics.compression_ratio(model) == float("inf")


def test_flops_and_latency_leave_model_unchanged():
    model, x = ConvNet(), torch.randn(2, 3, 16, 16)
    masking.attach(model, "conv2.weight", half_mask(tuple(model.conv2.weight.shape)))
    model.train()
    model.bn.eval()  # mixed modes must come back as they were
    before = copy.deepcopy(model)
    threads = torch.get_num_threads()
    metrics.flops(model, x)
    metrics.latency(model, x, warmup=1, repeats=2, threads=2)
    metrics.summary(model, x, print_table=False)
    metrics.model_size(model)
    assert torch.get_num_threads() == threads
    assert [m.training for m in model.modules()] == [m.training for m in before.modules()]
    assert params_equal(model, before)  # BatchNorm running stats untouched too


# --- latency -------------------------------------------------------------------------------------


def test_latency_stats():
    model, x = mlp(), torch.randn(4, 12)
    stats = metrics.latency_stats(model, x, warmup=1, repeats=5)
    assert stats["repeats"] == 5
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert stats["min"] <= stats["mean"] <= stats["max"]
    value = metrics.latency(model, x, warmup=0, repeats=3)
    assert isinstance(value, float) and value > 0
    with pytest.raises(ValueError):
        metrics.latency(model, x, repeats=0)


# --- size ----------------------------------------------------------------------------------------


def test_model_size_grows_with_parameters():
    small = metrics.model_size(nn.Linear(10, 10, bias=False))
    large = metrics.model_size(nn.Linear(100, 100, bias=False))
    assert 0 < small - 400 < 200  # 100 float32 + header
    assert 0 < large - 40_000 < 200
    assert (large - small) == 4 * (100 * 100 - 10 * 10)


def test_model_size_ignores_masks_and_ties(tmp_path):
    model = Tied()
    dense = metrics.model_size(model)
    masking.attach(model, "head.weight", half_mask((10, 4)))
    assert metrics.model_size(model) == dense  # dense format: same names, same bytes, no mask buffers
    import prunekit as pk

    sparse_file = pk.save(model, tmp_path / "sparse.safetensors", format="sparse")
    assert metrics.model_size(model, sparse=True) == metrics.file_size(sparse_file)

    from safetensors.torch import load, save_file

    tensors = load(metrics.safetensors_save(metrics._effective_state_dict(model)))
    assert set(tensors) == {"emb.weight"}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    assert metrics.file_size(path) == dense


def test_model_size_includes_buffers():
    model = nn.BatchNorm1d(10)
    # weight, bias, running_mean, running_var (float32) and num_batches_tracked (int64)
    assert 0 < metrics.model_size(model) - (4 * 10 * 4 + 8) < 400


# --- summary -------------------------------------------------------------------------------------


def test_summary_rows_and_total(capsys):
    model, x = ConvNet(), torch.randn(2, 3, 16, 16)
    masking.attach(model, "fc.weight", half_mask((10, 16)))
    rows = metrics.summary(model, x, print_table=True)
    printed = capsys.readouterr().out
    assert "conv1" in printed and "total" in printed and "FLOPs" in printed

    assert [r["name"] for r in rows] == ["conv1", "bn", "conv2", "conv3", "fc", "total"]
    total = rows[-1]
    assert (total["params"], total["nonzero"]) == metrics.count_params(model)
    assert sum(r["params"] for r in rows[:-1]) == total["params"]
    assert (total["flops"], total["remaining_flops"]) == metrics.flops(model, x)
    fc = rows[4]
    assert fc["shape"] == (10, 16) and fc["type"] == "Linear"
    assert fc["nonzero"] == 80 + 10 and fc["remaining_flops"] == fc["flops"] // 2


def test_summary_without_inputs_and_tied():
    rows = metrics.summary(Tied(), print_table=False)
    assert [r["name"] for r in rows] == ["emb", "head", "total"]
    assert [r["params"] for r in rows] == [40, 0, 40]
    assert all(r["flops"] is None for r in rows)


def test_report_metrics():
    model, x = mlp(), torch.randn(4, 12)
    masking.attach(model, "2.weight", half_mask((32, 32)))
    report = metrics.report_metrics(model, x, repeats=2)
    assert (report["params_total"], report["params_nonzero"]) == metrics.count_params(model)
    assert report["compression_ratio"] == metrics.compression_ratio(model)
    assert (report["flops_dense"], report["flops_remaining"]) == metrics.flops(model, x)
    assert report["theoretical_speedup"] == metrics.theoretical_speedup(model, x) > 1
    assert report["latency_s"] > 0
    assert report["size_bytes"] == metrics.model_size(model)
    assert report["size_sparse_bytes"] == metrics.model_size(model, sparse=True)
    assert metrics.report_metrics(model, x, measure_latency=False)["latency_s"] is None


def test_format_helpers():
    assert format_count(512) == "512"
    assert format_count(1_234_567) == "1.2M"
    assert format_count(3_400_000, "FLOPs") == "3.4 MFLOPs"
    assert format_count(12, "FLOPs") == "12 FLOPs"
    assert format_bytes(100) == "100 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(5 * 1024**2) == "5.0 MiB"


def test_transformer_fast_path_is_counted():
    """In eval mode under no_grad, TransformerEncoderLayer takes a fused path FlopCounterMode can't see."""
    model, x = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), torch.randn(2, 5, 16)
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        expected = reference_flops(model, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert metrics.flops(model, x) == (expected, expected) and expected > 0
    assert torch.backends.mha.get_fastpath_enabled()
    masking.attach(model, "linear1.weight", half_mask((32, 16)))
    dense, remaining = metrics.flops(model, x)
    assert dense - remaining == 2 * 10 * 16 * 32 // 2
