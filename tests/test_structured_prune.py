"""pk.structured.prune: group criteria (checked by hand), channel selection, the API and its errors,
channel masks vs surgery, dead channels, residual blocks, the Pruner, and accuracy after fine-tuning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from structured_models import MHANet
from torch import nn

import prunekit as pk
from prunekit.data import digits, evaluate, loaders, synthetic_images, train
from prunekit.models import TinyMLP, resnet8, resnet20, vgg_small
from prunekit.structured import (
    DependencyGraph,
    StructuredSpec,
    remove_blocks,
    residual_blocks,
)
from prunekit.structured.criteria import (
    GROUP_CRITERIA,
    ScoringContext,
    fisher_ratio,
    get_group_criterion,
    histogram_entropy,
    ranked_redundancy,
)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0, 0.1, 3.0]))
        model.bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0, 0.5]))
    return model


def _hidden_group(model, x):
    graph = DependencyGraph(model, x)
    return graph, graph.group_of("fc1")


# --- criteria, by hand ----------------------------------------------------------------------------


def test_group_l1_l2_aggregate_every_parameter_slice_and_l1_l2_read_the_filter_only():
    model = _mlp()
    graph, g = _hidden_group(model, torch.randn(3, 4))
    ctx = ScoringContext(graph)
    w1, b1, w2 = model.fc1.weight, model.fc1.bias, model.fc2.weight
    gamma, beta = model.bn.weight, model.bn.bias
    l1 = w1.abs().sum(1) + b1.abs() + gamma.abs() + beta.abs() + w2.abs().sum(0)
    l2 = (w1.square().sum(1) + b1.square() + gamma.square() + beta.square() + w2.square().sum(0)).sqrt()
    assert torch.allclose(get_group_criterion("group_l1").score(g, ctx), l1.detach())
    assert torch.allclose(get_group_criterion("group_l2").score(g, ctx), l2.detach())
    # Li et al. 2017: the sum of the filter's absolute kernel weights, nothing else
    assert torch.allclose(get_group_criterion("l1").score(g, ctx), w1.abs().sum(1).detach())
    assert torch.allclose(get_group_criterion("l2").score(g, ctx), w1.norm(dim=1).detach())
    assert torch.allclose(get_group_criterion("bn_scale").score(g, ctx), gamma.abs().detach())


def test_bn_scale_needs_a_norm_layer():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="bn_scale.*needs a normalisation layer"):
        pk.structured.prune(model, torch.randn(2, 4), 0.4, method="bn_scale")


def test_taylor_is_the_squared_group_sum_of_w_times_grad_averaged_over_batches():
    model = _mlp()
    batches = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(3)]
    graph, g = _hidden_group(model, batches[0][0])
    got = get_group_criterion("taylor").score(g, ScoringContext(graph, batches))
    expected = torch.zeros(5)
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        gate = (model.fc1.weight * model.fc1.weight.grad).sum(1) + model.fc1.bias * model.fc1.bias.grad
        gate += model.bn.weight * model.bn.weight.grad + model.bn.bias * model.bn.bias.grad
        gate += (model.fc2.weight * model.fc2.weight.grad).sum(0)
        expected += gate.detach().square()
    assert torch.allclose(got, expected / 3, rtol=1e-4, atol=1e-9)


def test_activation_criteria_read_what_the_next_layer_reads():
    model = _mlp()
    data = [torch.randn(16, 4) for _ in range(2)]
    graph, g = _hidden_group(model, data[0])
    seen = []
    handle = model.fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for x in data:
            model(x)
    handle.remove()
    acts = torch.cat(seen)
    ctx = ScoringContext(graph, data)
    assert torch.allclose(get_group_criterion("apoz").score(g, ctx), 1 - (acts == 0).float().mean(0))
    assert torch.allclose(get_group_criterion("activation").score(g, ctx), acts.abs().mean(0))
    assert torch.allclose(get_group_criterion("entropy").score(g, ctx), histogram_entropy(acts))


def test_entropy_fisher_and_redundancy_formulas():
    uniform = torch.arange(100.0)[:, None] / 100  # 10 values in each of 10 bins
    assert torch.allclose(histogram_entropy(uniform), torch.tensor([math.log(10)]))
    assert histogram_entropy(torch.ones(7, 1)).item() == 0.0
    two = torch.tensor([[0.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 2.0]])
    ratio = fisher_ratio(two, torch.tensor([0, 0, 1, 1]))
    assert ratio[0] > 1e6 and ratio[1] == 0.0  # column 0 separates the classes, column 1 not at all
    half = fisher_ratio(torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(half, torch.tensor([4.0 / 1.0]))  # between 2*(1)^2*2=4, within 4*0.25=1
    vectors = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    scores = ranked_redundancy(vectors, vectors.norm(dim=1))
    assert scores.tolist() == [0.0, 1.0, 1.0]  # the weaker copy of a filter goes, the stronger stays


def test_similarity_prunes_one_copy_of_duplicated_filters():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight[3] = model[0].weight[1] * 0.5
        model[0].bias[3] = model[0].bias[1] * 0.5
        model[2].weight[:, 3] = model[2].weight[:, 1] * 0.5
    graph = DependencyGraph(model, torch.randn(1, 2, 5, 5))
    s = get_group_criterion("similarity").score(graph.groups()[0], ScoringContext(graph))
    assert s[3].item() == pytest.approx(0.0, abs=1e-6) and s[1].item() > 0.5
    report = pk.structured.prune(model, torch.randn(1, 2, 5, 5), 0.25, method="similarity")
    assert report.groups[0].removed == (3,)


def test_lda_and_correlation_from_labelled_batches():
    torch.manual_seed(0)
    train_set, _ = synthetic_images(n=64, size=8)
    loader = torch.utils.data.DataLoader(train_set, batch_size=16)
    model = resnet8(widths=(4, 8, 8), num_classes=4).eval()
    graph = DependencyGraph(model, train_set.tensors[0][:2])
    ctx = ScoringContext(graph, loader)
    for name in ("lda", "correlation"):
        scores = get_group_criterion(name).score(graph.groups()[1], ctx)
        assert scores.shape == (4,) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="lda.*labelled"):
        get_group_criterion("lda").score(graph.groups()[1], ScoringContext(graph, [train_set.tensors[0][:8]]))


def test_every_registered_method_prunes_a_resnet():
    loader = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    x = loader[0][0][:2]
    assert set(GROUP_CRITERIA.names()) == {"l1", "l2", "group_l1", "group_l2", "bn_scale", "taylor", "apoz", "activation", "entropy",
                                           "lda", "similarity", "correlation", "random", "taylor_so"}
    for method in GROUP_CRITERIA.names():
        model = resnet8().eval()
        before = model(x).shape
        report = pk.structured.prune(model, x, 0.5, method=method, data=loader)
        assert report.channel_fraction == pytest.approx(0.5)
        assert model(x).shape == before and report.params_after < report.params_before / 2


# --- selection ---------------------------------------------------------------------------------------


def test_local_ratio_round_to_and_never_empty():
    x = torch.randn(1, 3, 16, 16)
    model = vgg_small()
    report = pk.structured.prune(model, x, 0.5, round_to=16)
    assert [g.channels_after for g in report.groups] == [16, 32, 64, 64, 128]
    assert model.features[0].out_channels == 16
    model = vgg_small()
    report = pk.structured.prune(model, x, 0.9, min_channels=8)
    assert [g.channels_after for g in report.groups] == [8, 8, 13, 13, 26]
    report = pk.structured.prune(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)),
                                 torch.randn(2, 3), 0.99)
    assert report.groups[0].channels_after == 1  # a group never empties


def test_global_scope_normalises_each_group_by_its_mean():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    graph = DependencyGraph(model, torch.randn(2, 3))
    groups = graph.groups()
    small = torch.tensor([1.0, 2.0, 3.0, 4.0]) * 1e-3  # tiny scale, same shape of distribution
    large = torch.tensor([4.0, 3.0, 0.5, 1.0]) * 1e3
    removal = pk.structured.select_channels(groups, [small, large], 0.25, "global")
    # normalised: small -> [.4, .8, 1.2, 1.6], large -> [1.88, 1.41, .24, .47]: the two lowest go
    assert {k: v.tolist() for k, v in removal.items()} == {0: [0], 1: [2]}
    removal = pk.structured.select_channels(groups, [small, large], 0.5, "global", min_channels=3)
    assert {k: v.tolist() for k, v in removal.items()} == {0: [0], 1: [2]}  # capped at one each


def test_per_layer_ratios():
    model = resnet8()
    x = torch.randn(1, 3, 16, 16)
    report = pk.structured.prune(model, x, {"layer1.*": 0.5, "layer3.0.conv1": 0.25})
    after = {g.name: (g.channels_before, g.channels_after) for g in report.groups}
    assert after["layer1.0.conv1"] == (16, 8) and after["layer3.0.conv1"] == (64, 48)
    assert after["conv1"] == (16, 8)  # layer1.0.conv2 writes the stem's group too
    assert after["layer2.0.conv1"] == (32, 32)
    with pytest.raises(ValueError, match="matches no prunable group"):
        pk.structured.prune(resnet8(), x, {"layer9": 0.5})
    with pytest.raises(ValueError, match="scope='local'"):
        pk.structured.prune(resnet8(), x, {"layer1.*": 0.5}, scope="global")


def test_bad_input_is_refused_before_any_change():
    model = resnet8()
    x = torch.randn(1, 3, 16, 16)
    state = copy.deepcopy(model.state_dict())
    for kwargs, message in [
        (dict(method="L1x"), "unknown structured method 'L1x'; did you mean 'l1'"),
        (dict(scope="globl"), "did you mean 'global'"),
        (dict(ratio=1.0), "ratio must be in"),
        (dict(method="taylor"), "'taylor' is data-driven"),
        (dict(round_to=0), "round_to must be a positive integer"),
        (dict(exclude=["nothing"]), "exclude pattern 'nothing'"),
    ]:
        with pytest.raises(ValueError, match=message):
            pk.structured.prune(model, x, **({"ratio": 0.5} | kwargs))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_exclude_keeps_layers_whole():
    model = resnet8()
    pk.structured.prune(model, torch.randn(1, 3, 16, 16), 0.5, exclude=["layer3"])
    assert model.layer3[0].conv1.out_channels == 64 and model.layer3[0].conv2.out_channels == 64
    assert model.layer2[0].conv2.out_channels == 32  # layer3.0 reads it: pinned by the exclusion
    assert model.layer1[0].conv1.out_channels == 8


# --- masks vs surgery, explicit removal, dead channels ---------------------------------------------


@pytest.mark.parametrize("make,shape", [(resnet8, (2, 3, 16, 16)), (MHANet, (2, 5, 5))])
def test_masked_and_physical_pruning_agree(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    masked, physical = copy.deepcopy(model), copy.deepcopy(model)
    r1 = pk.structured.prune(masked, x, 0.5, physical=False)
    r2 = pk.structured.prune(physical, x, 0.5)
    assert [g.removed for g in r1.groups] == [g.removed for g in r2.groups]
    with torch.no_grad():
        assert (masked(x) - physical(x)).abs().max() < 1e-5
    assert pk.sparsity(masked) > 0.4


def test_explicit_removal_of_named_channels():
    model = vgg_small().eval()
    x = torch.randn(2, 3, 16, 16)
    keep = [i for i in range(32) if i not in (3, 7)]
    w0, w1 = model.features[0].weight[keep].clone(), model.features[4].weight[:, keep].clone()
    report = pk.structured.remove(model, x, "features.0", [3, 7])
    assert report.groups[0].removed == (3, 7)
    assert torch.equal(model.features[0].weight, w0) and torch.equal(model.features[4].weight, w1)
    pk.structured.remove(model, x, "features.4", [0], dim="in")  # an input channel: the same group
    assert model.features[0].out_channels == 29
    with pytest.raises(ValueError, match="cannot be removed.*output"):
        pk.structured.remove(model, x, "classifier", [0])
    with pytest.raises(ValueError, match="unknown layer 'feature.0'; did you mean 'features.0'"):
        pk.structured.remove(model, x, "feature.0", [0])
    with pytest.raises(ValueError, match="would empty"):
        pk.structured.remove(model, x, "features.0", list(range(29)))


def test_dead_neurons_after_unstructured_pruning_are_removed_exactly():
    torch.manual_seed(0)
    model = TinyMLP(in_features=8, hidden=12, num_classes=3).eval()
    x = torch.randn(5, 8)
    in_mask = torch.ones(12, 8, dtype=torch.bool)
    in_mask[:3] = False  # neurons 0-2 get no input...
    pk.masking.attach(model, "fc1.weight", in_mask)
    bias_mask = torch.ones(12, dtype=torch.bool)
    bias_mask[:3] = False
    pk.masking.attach(model, "fc1.bias", bias_mask)
    out_mask = torch.ones(3, 12, dtype=torch.bool)
    out_mask[:, 10:] = False  # ...and neurons 10-11 feed nothing
    pk.masking.attach(model, "fc2.weight", out_mask)
    with torch.no_grad():
        expected = model(x)
    report = pk.structured.remove_dead(model, x)
    assert report.groups[0].removed == (0, 1, 2, 10, 11)
    assert model.fc1.out_features == 7 and model.fc2.in_features == 7
    assert pk.masks(model)["fc1.weight"].shape == (7, 8)  # masks shrink with their parameters
    with torch.no_grad():
        assert (model(x) - expected).abs().max() < 1e-6


def test_a_zero_filter_behind_a_normalisation_shift_is_not_dead():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 0
        model[1].bias.fill_(0.5)  # channel 1 reads relu(0.5): a constant, not nothing
        model[0].weight[2] = 0
        model[0].bias[2] = 0
        model[1].bias[2] = -1.0  # relu(-1) = 0: truly dead
    report = pk.structured.remove_dead(model, torch.randn(2, 3, 6, 6))
    assert report.groups[0].removed == (2,)


# --- residual blocks ----------------------------------------------------------------------------------


def test_residual_blocks_are_found_scored_and_replaced():
    model = resnet20().eval()
    x = torch.randn(2, 3, 16, 16)
    blocks = residual_blocks(model, x)
    assert blocks == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    with torch.no_grad():
        h = model.layer1(model.relu(model.bn1(model.conv1(x))))
        rel = ((model.layer2[1](model.layer2[0](h)) - model.layer2[0](h)).norm() / model.layer2[0](h).norm()).item()
    scores = pk.structured.block_scores(model, ["layer2.1"], [x])
    assert scores["layer2.1"] == pytest.approx(rel, rel=1e-5)
    removed = remove_blocks(model, x, 2)
    assert len(removed) == 2
    for name in removed:
        assert isinstance(model.get_submodule(name), pk.structured.RemovedBlock)
    assert model(x).shape == (2, 10)
    with pytest.raises(ValueError, match="not a residual block"):
        remove_blocks(model, x, 1, blocks=["layer2.0"])
    with pytest.raises(ValueError, match="needs labelled data"):
        remove_blocks(model, x, 1, method="loss")


def test_block_removal_by_loss_increase_removes_the_least_useful_block():
    torch.manual_seed(0)
    model = resnet8(widths=(4, 8, 8)).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # make layer1.0 contribute nothing: dropping it costs nothing
        model.layer1[0].bn2.weight.zero_()
        model.layer1[0].bn2.bias.zero_()
    data = [(x, torch.tensor([0, 1, 2, 3]))]
    removed = remove_blocks(model, x, 1, method="loss", data=data)
    assert list(removed) == ["layer1.0"] and abs(removed["layer1.0"]) < 1e-6


# --- the Pruner -------------------------------------------------------------------------------------


def test_iterative_structured_pruning_through_the_pruner_then_compact():
    torch.manual_seed(0)
    model = resnet8(widths=(8, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    spec = StructuredSpec(model, x[:1], method="l1", scope="global")
    pruner = pk.Pruner(model, pk.schedules.Iterative(0.5, steps=3, every=2), structured=spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    y = torch.randint(0, 10, (4,))
    fractions = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        report = pruner.step()
        if report is not None:
            fractions.append(report.sparsity)
    expected = [1 - 0.5 ** (k / 3) for k in (1, 2, 3)]
    assert fractions == pytest.approx(expected, abs=0.03)
    masked = spec.masked()
    assert sum(int(m.sum()) for m in masked) == pytest.approx(0.5 * sum(m.numel() for m in masked), abs=1)
    model.eval()
    with torch.no_grad():
        before = model(x)
    spec.compact()
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-5
    assert model.layer1[0].conv1.out_channels < 8
    with pytest.raises(ValueError, match="built on this model"):
        pk.Pruner(resnet8(), pk.schedules.OneShot(0.5), structured=spec)


# --- accuracy ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resnet_on_digits_half_the_channels_removed_and_finetuned_stays_within_one_point():
    torch.manual_seed(0)
    train_set, test_set = digits(image=True)
    train_loader, test_loader = loaders(train_set, test_set, batch_size=64)
    model = resnet8(in_channels=1)
    train(model, train_loader, epochs=12, lr=3e-3)
    dense = evaluate(model, test_loader)
    assert dense > 0.97
    report = pk.structured.prune(model, train_set.tensors[0][:8], 0.5, method="l1")
    assert report.channel_fraction == pytest.approx(0.5) and report.params_after < 0.3 * report.params_before
    train(model, train_loader, epochs=6, lr=3e-3)
    train(model, train_loader, epochs=4, lr=5e-4)
    assert evaluate(model, test_loader) >= dense - 0.01
