"""pk.prune: criteria, granularities, scopes, validation; compared with torch.nn.utils.prune and by hand."""

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunekit as pk
from prunekit.scope import erk_sparsities, lamp_scores


def convnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(), nn.Linear(32, 10),
    )


def layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def twin(make):
    torch.manual_seed(0)
    a = make()
    torch.manual_seed(0)
    return a, make()


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


# --- magnitude against torch.nn.utils.prune -------------------------------------------------------


@pytest.mark.filterwarnings("ignore:pruned to 100%")  # at 0.97 one layer is emptied, as in torch
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.97])
def test_global_magnitude_keeps_exactly_what_torch_global_unstructured_keeps(sparsity):
    ours, theirs = twin(convnet)
    pk.prune(ours, sparsity, method="magnitude", scope="global")
    torch_prune.global_unstructured(
        [(m, "weight") for m in layers(theirs)], pruning_method=torch_prune.L1Unstructured, amount=sparsity
    )
    for name, module in zip(pk.masks(ours), layers(theirs)):
        assert torch.equal(pk.masks(ours)[name], module.weight_mask.bool()), name


def test_local_magnitude_matches_torch_l1_unstructured_per_layer():
    ours, theirs = twin(convnet)
    pk.prune(ours, 0.6, scope="local")
    for module in layers(theirs):
        torch_prune.l1_unstructured(module, "weight", amount=0.6)
    for mask, module in zip(pk.masks(ours).values(), layers(theirs)):
        assert torch.equal(mask, module.weight_mask.bool())


def test_channel_l1_local_matches_torch_ln_structured():
    ours, theirs = twin(convnet)
    pk.prune(ours, 0.5, granularity="channel", scope="local", group_norm="l1")
    for module in layers(theirs):
        torch_prune.ln_structured(module, "weight", amount=0.5, n=1, dim=0)
    for mask, module in zip(pk.masks(ours).values(), layers(theirs)):
        assert torch.equal(mask, module.weight_mask.bool())


def test_global_counts_exactly_and_breaks_ties_by_layer_then_index():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    with torch.no_grad():
        for m in model:
            m.weight.fill_(0.5)
    pk.prune(model, 0.4)  # round(0.4 * 35) = 14 tied weights
    first, second = pk.masks(model).values()
    assert int((~first).sum()) == 14 and bool(second.all())
    assert torch.equal(~first.flatten(), torch.arange(20) < 14)


def test_pruning_again_only_removes_more():
    model = convnet()
    pk.prune(model, 0.5)
    before = {n: m.clone() for n, m in pk.masks(model).items()}
    pk.prune(model, 0.3, method="random")  # lower target: nothing comes back
    pk.prune(model, 0.8, method="random", seed=3)
    for name, mask in pk.masks(model).items():
        assert not (mask & ~before[name]).any()
    assert pk.sparsity(model) == pytest.approx(0.8, abs=1e-3)


def test_random_is_seeded():
    a, b = twin(convnet)
    c = convnet()
    c.load_state_dict(a.state_dict())
    pk.prune(a, 0.5, method="random", seed=7)
    pk.prune(b, 0.5, method="random", seed=7)
    pk.prune(c, 0.5, method="random", seed=8)
    assert all(torch.equal(x, y) for x, y in zip(pk.masks(a).values(), pk.masks(b).values()))
    assert not all(torch.equal(x, z) for x, z in zip(pk.masks(a).values(), pk.masks(c).values()))
    assert pk.sparsity(a) == pytest.approx(0.5, abs=1e-3)


# --- data-driven criteria, against hand-computed scores ----------------------------------------------


def assert_prunes_lowest(mask, scores, fraction):
    """Exactly round(fraction * n) entries pruned, and no kept score below a pruned one."""
    k = round(fraction * scores.numel())
    assert int((~mask).sum()) == k
    assert scores[~mask].max() <= scores[mask].min()


def mean_batch_gradients(model, data):
    """(weights, mean gradient, mean |gradient|, mean squared gradient) over the batches."""
    params = [m.weight for m in layers(model)]
    sums = [torch.zeros_like(p) for p in params]
    abs_sums = [torch.zeros_like(p) for p in params]
    sq = [torch.zeros_like(p) for p in params]
    for x, y in data:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        for s, a, q, g in zip(sums, abs_sums, sq, grads):
            s += g
            a += g.abs()
            q += g * g
    n = len(data)
    return params, [s / n for s in sums], [a / n for a in abs_sums], [q / n for q in sq]


@pytest.mark.parametrize("method", ["grad_abs", "weight_grad_abs", "taylor"])  # obd: tests/test_obd.py
def test_gradient_criteria_follow_their_formulas(method):
    model = convnet()
    data = batches()
    params, _, abs_grads, fisher = mean_batch_gradients(model, data)
    formula = {
        "grad_abs": lambda w, g, f: g,  # mean over batches of |g_b|
        "weight_grad_abs": lambda w, g, f: w.abs() * g,  # mean over batches of |w g_b|
        "taylor": lambda w, g, f: w * w * f,  # mean over batches of (w g_b)^2 (Molchanov et al. 2019)
    }[method]
    expected_scores = [formula(w.detach(), g, f) for w, g, f in zip(params, abs_grads, fisher)]
    pk.prune(model, 0.6, method=method, scope="local", data=data)
    for mask, scores in zip(pk.masks(model).values(), expected_scores):
        assert_prunes_lowest(mask, scores, 0.6)


def test_gradient_is_a_deprecated_alias_of_grad_abs_and_is_not_listed():
    a, b = twin(convnet)
    data = batches()
    pk.prune(a, 0.5, method="grad_abs", data=data)
    with pytest.warns(DeprecationWarning, match="'gradient' is deprecated; it is now called 'grad_abs'"):
        pk.prune(b, 0.5, method="gradient", data=data)
    assert all(torch.equal(x, y) for x, y in zip(pk.masks(a).values(), pk.masks(b).values()))
    assert "gradient" not in pk.criteria.CRITERIA.names() and "gradient" in pk.criteria.CRITERIA


def test_movement_scores_are_minus_w_g_summed():
    model = convnet()
    data = batches(2)
    params, grads, _, _ = mean_batch_gradients(model, data)
    expected = [-(w.detach() * g) * len(data) for w, g in zip(params, grads)]
    pk.prune(model, 0.5, method="movement", scope="local", data=data)
    for mask, scores in zip(pk.masks(model).values(), expected):
        assert_prunes_lowest(mask, scores, 0.5)


def test_data_driven_pruning_leaves_grads_mode_and_buffers_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 10))
    model.train()
    running = model[1].running_mean.clone()
    pk.prune(model, 0.5, method="taylor", data=batches())
    assert model.training
    assert torch.equal(model[1].running_mean, running)
    assert all(p.grad is None for p in model.parameters())


# --- granularities ------------------------------------------------------------------------------


def test_vector_granularity_prunes_whole_rows_of_a_linear():
    model = nn.Sequential(nn.Linear(6, 10))
    pk.prune(model, 0.4, granularity="vector")
    mask = pk.masks(model)["0.weight"]
    rows = mask.all(dim=1) | (~mask).all(dim=1)
    assert rows.all() and int((~mask.all(dim=1)).sum()) == 4
    norms = model[0].parametrizations.weight.original.abs().sum(1)  # pruned rows are zero now
    assert (norms[~mask.all(dim=1)] == 0).all()


def test_column_granularity_prunes_input_neurons_by_l2():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 6))
    weight = model[0].weight.detach().clone()
    pk.prune(model, 0.3, granularity="column", group_norm="l2")
    mask = pk.masks(model)["0.weight"]
    pruned_cols = (~mask).all(dim=0)
    assert torch.equal(pruned_cols, weight.norm(dim=0) <= weight.norm(dim=0).kthvalue(3).values)


def test_kernel_granularity_prunes_whole_kernels():
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    weight = model[0].weight.detach().clone()
    pk.prune(model, 0.5, granularity="kernel")
    mask = pk.masks(model)["0.weight"]
    kept = mask.flatten(2)
    assert (kept.all(2) | (~kept).all(2)).all()
    l1 = weight.abs().sum((2, 3))
    assert torch.equal((~kept).all(2), l1 <= l1.flatten().kthvalue(12).values)
    with pytest.raises(ValueError, match="kernel granularity needs .* 0.weight"):
        pk.prune(nn.Sequential(nn.Linear(4, 4)), 0.5, granularity="kernel")


def test_channel_granularity_on_conv_transpose_uses_output_dim():
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3))  # weight (in=4, out=6, 3, 3)
    pk.prune(model, 0.5, granularity="channel")
    mask = pk.masks(model)["0.weight"]
    per_out = mask.transpose(0, 1).flatten(1)
    assert (per_out.all(1) | (~per_out).all(1)).all() and int((~per_out.all(1)).sum()) == 3


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_n_m_keeps_the_n_largest_of_every_m(pattern, n, m):
    model = nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Conv2d(8, 4, 3))
    linear_w = model[0].weight.detach().clone()
    conv_w = model[2].weight.detach().clone()
    report = pk.prune(model, granularity=pattern)
    assert report.sparsity == pytest.approx(1 - n / m)
    masks = pk.masks(model)
    blocks = masks["0.weight"].reshape(6, 16 // m, m)
    assert (blocks.sum(-1) == n).all()
    expected = linear_w.abs().reshape(6, -1, m).topk(n, dim=-1).indices
    assert torch.equal(blocks.gather(-1, expected), torch.ones_like(expected, dtype=torch.bool))
    conv_blocks = masks["2.weight"].permute(0, 2, 3, 1).reshape(-1, m)  # along input channels
    assert (conv_blocks.sum(-1) == n).all()
    expected = conv_w.abs().permute(0, 2, 3, 1).reshape(-1, m).topk(n, dim=-1).indices
    assert conv_blocks.gather(-1, expected).all()


def test_n_m_errors():
    with pytest.raises(ValueError, match="N <= M"):
        pk.prune(nn.Linear(8, 8), granularity="5:4")
    model = nn.Sequential(nn.Linear(10, 8))
    with pytest.raises(ValueError, match="0.weight has size 10, not divisible by M=4"):
        pk.prune(model, granularity="2:4")
    with pytest.raises(ValueError, match="fixes sparsity at 0.5"):
        pk.prune(nn.Sequential(nn.Linear(8, 8)), 0.7, granularity="2:4")


# --- scopes ---------------------------------------------------------------------------------------


def test_lamp_scores_by_hand():
    w = torch.tensor([0.5, -2.0, 1.0, 0.1])
    sq = torch.tensor([0.25, 4.0, 1.0, 0.01])
    # sorted ascending |w|: 0.1, 0.5, 1.0, 2.0; denominators are suffix sums of squares
    expected = torch.tensor([0.25 / 5.25, 4.0 / 4.0, 1.0 / 5.0, 0.01 / 5.26])
    assert torch.allclose(lamp_scores(w), expected)
    assert torch.allclose(lamp_scores(w), sq / torch.tensor([5.25, 4.0, 5.0, 5.26]))


def test_lamp_never_empties_a_layer_and_hits_the_global_target():
    model = convnet()
    with torch.no_grad():
        layers(model)[-1].weight.mul_(1e-4)  # global magnitude would wipe this layer out
    report = pk.prune(model, 0.95, scope="lamp")
    assert report.sparsity == pytest.approx(0.95, abs=1e-3)
    assert all(mask.any() for mask in pk.masks(model).values())


def test_erk_allocation_follows_its_formula():
    shapes = [(8, 3, 3, 3), (16, 8, 3, 3), (32, 256), (10, 32)]
    sizes = [math.prod(s) for s in shapes]
    sparsities = erk_sparsities(shapes, 0.8)
    densities = [1 - s for s in sparsities]
    assert sum(d * n for d, n in zip(densities, sizes)) == pytest.approx(0.2 * sum(sizes))
    free = [i for i, d in enumerate(densities) if d < 1]
    ratios = [densities[i] / (sum(shapes[i]) / sizes[i]) for i in free]
    assert max(ratios) == pytest.approx(min(ratios))  # one scale factor for every non-dense layer
    model = convnet()
    report = pk.prune(model, 0.8, scope="erk")
    assert report.sparsity == pytest.approx(0.8, abs=0.01)


def test_per_layer_dict_scope():
    model = convnet()
    report = pk.prune(model, scope={"0": 0.5, "5": 0.9})
    got = {l.name: l.sparsity_after for l in report.layers}
    assert got["0.weight"] == pytest.approx(0.5, abs=0.01) and got["5.weight"] == pytest.approx(0.9, abs=0.01)
    assert got["2.weight"] == 0.0
    with pytest.raises(ValueError, match="'nothing' matches none of the targets"):
        pk.prune(convnet(), scope={"nothing": 0.5})


def test_max_layer_sparsity_caps_every_layer_and_warns_at_100_percent():
    model = convnet()
    with torch.no_grad():
        layers(model)[-1].weight.mul_(1e-4)
    with pytest.warns(UserWarning, match="pruned to 100%: 7.weight"):
        pk.prune(model, 0.9)
    capped = convnet()
    with torch.no_grad():
        layers(capped)[-1].weight.mul_(1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = pk.prune(capped, 0.9, max_layer_sparsity=0.93)
    assert max(l.sparsity_after for l in report.layers) <= 0.93 + 1e-9
    assert report.layers[-1].sparsity_after == pytest.approx(0.93, abs=1 / 320)
    assert report.sparsity == pytest.approx(0.9, abs=1e-3)  # the budget moved to other layers
    with pytest.warns(UserWarning, match="caps every layer"):  # 0.8 everywhere cannot reach 0.9
        pk.prune(convnet(), 0.9, max_layer_sparsity=0.8)


# --- bad input: a clear error, and the model untouched ---------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\), got 1.0"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=0.5, method="magnitud"), "unknown method 'magnitud'; did you mean 'magnitude'"),
        (dict(sparsity=0.5, scope="globl"), "unknown scope 'globl'; did you mean 'global'"),
        (dict(sparsity=0.5, granularity="chanel"), "unknown granularity 'chanel'; did you mean 'channel'"),
        (dict(sparsity=0.5, targets=["nothing*"]), "target 'nothing\\*' matches no parameter"),
        (dict(sparsity=0.5, exclude=["fc"]), "exclude pattern 'fc' matches none of the targets"),
        (dict(sparsity=0.5, method="taylor"), "method 'taylor' is data-driven: pass data="),
        (dict(sparsity=0.5, group_norm="l3"), "group_norm must be one of"),
        (dict(sparsity=0.5, max_layer_sparsity=0.0), "max_layer_sparsity must be in"),
        (dict(), "sparsity is required"),
    ],
)
def test_bad_input_is_rejected_before_anything_changes(kwargs, message):
    model = convnet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=message):
        pk.prune(model, **kwargs)
    assert pk.masks(model) == {}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_frozen_and_integer_parameters_are_rejected():
    model = convnet()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="cannot prune 0.weight: it is frozen"):
        pk.prune(model, 0.5)
    assert pk.masks(model) == {}
    pk.prune(model, 0.5, exclude="0")  # excluding it is the way out
    assert "0.weight" not in pk.masks(model)
    holder = nn.Module()
    holder.register_parameter("steps", nn.Parameter(torch.zeros(4, dtype=torch.int64), requires_grad=False))
    with pytest.raises(TypeError, match="steps: it holds torch.int64"):
        pk.prune(holder, 0.5, targets=["steps"])


def test_targets_by_type_glob_and_parameter_name():
    model = convnet()
    report = pk.prune(model, 0.5, targets=[nn.Conv2d])
    assert [l.name for l in report.layers] == ["0.weight", "2.weight"]
    report = pk.prune(convnet(), 0.5, targets=["5*", "7.bias"])
    assert [l.name for l in report.layers] == ["5.weight", "7.bias"]


@pytest.mark.slow
def test_global_selection_memory_stays_below_a_quarter_of_the_targets():
    # Measured in a fresh process: peak resident memory during pk.prune beyond what the masks take.
    code = textwrap.dedent(
        """
        import resource, torch, prunekit as pk
        from torch import nn
        torch.set_num_threads(1)
        def peak():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
        model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(48)])  # 48M weights
        pk.prune(nn.Sequential(nn.Linear(64, 64)), 0.5)  # warm up code paths
        weights = sum(p.numel() * 4 for p in model.parameters())
        base = peak()
        pk.prune(model, 0.9)
        extra = peak() - base - weights // 4  # masks are one byte per weight
        print(extra / weights)
        """
    )
    # A fixed mmap threshold makes glibc return freed blocks, so peak RSS measures what prunekit holds
    # alive rather than what the allocator chose to keep cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert float(out.stdout.strip()) < 0.25


def test_nan_weights_are_reported_not_ranked():
    model = convnet()
    with torch.no_grad():
        layers(model)[1].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="scores contain NaN"):
        pk.prune(model, 0.5)
    assert pk.masks(model) == {}
