"""Dependency graph and surgery: zero chosen channels in every member of their group (normalisation
parameters included), remove them, and the outputs must not change (float32, < 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from structured_models import (
    CatNet,
    ChannelLayerNormNet,
    ChannelShuffleNet,
    ChunkNet,
    Conv1d3dNet,
    DepthwiseNet,
    EmbeddingNet,
    FlattenNet,
    GateNet,
    MHANet,
    NormsNet,
    PixelShuffleNet,
    RawParamNet,
    SharedConvNet,
    ShuffleModuleNet,
    SplitNet,
    TiedNet,
    TransposeNet,
)
from torch import nn

import prunekit as pk
from prunekit.models import resnet8, resnet20, vgg11, vgg_small
from prunekit.structured import (
    DependencyGraph,
    PrunedMultiheadAttention,
    UnsupportedOperationError,
    channel_masks,
    register_rule,
    remove_channels,
)

TOL = 1e-5


def _call(model, x):
    return model(*x) if isinstance(x, tuple) else model(x)


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial normalisation statistics and affine parameters, so a wrong removal shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)


def _choose(graph: DependencyGraph, fraction: float = 0.4, seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    removal = {}
    for g in graph.groups():
        if g.size < 2:
            continue
        k = min(g.size - 1, max(1, round(fraction * g.size)))
        removal[g.index] = torch.randperm(g.size, generator=gen)[:k].sort().values
    return removal


def _zero(graph: DependencyGraph, removal) -> None:
    with torch.no_grad():
        for g in graph.groups():
            if g.index in removal:
                for member, idx in g.slices(removal[g.index]):
                    if member.kind == "parameter":
                        member.info.tensor.index_fill_(member.dim, idx, 0.0)


def check_equivalence(model: nn.Module, x, fraction: float = 0.4, seed: int = 0):
    """Zero chosen channels everywhere in their group, remove them: outputs equal. Returns the graph,
    the removal and the parameter counts before and after."""
    model.eval()
    _randomise_norms(model)
    graph = DependencyGraph(model, x)
    removal = _choose(graph, fraction, seed)
    assert removal, "nothing prunable: the test would prove nothing"
    _zero(graph, removal)
    with torch.no_grad():
        expected = _call(model, x)
    before = sum(p.numel() for p in model.parameters())
    groups = graph.groups()
    remove_channels(graph, removal)
    with torch.no_grad():
        got = _call(model, x)
    after = sum(p.numel() for p in model.parameters())
    assert after < before
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)):
        assert e.shape == g.shape
        assert (e - g).abs().max().item() < TOL
    return groups, removal, before, after


# --- built-in models --------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [vgg_small, vgg11, resnet8, resnet20])
def test_builtin_models_zeroed_channels_removed_outputs_unchanged(make):
    model = make()
    groups, removal, before, after = check_equivalence(model, torch.randn(2, 3, 32, 32))
    # every conv writes channels of some group; only the classifier's outputs are pinned
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    producers = {p for g in groups for p in g.producers}
    assert set(convs) <= producers


def test_resnet_residual_stream_is_one_group_across_blocks():
    model = resnet8()
    graph = DependencyGraph(model, torch.randn(1, 3, 32, 32))
    stage2 = graph.group_of("layer2.0.conv2")
    names = {(m.name, m.dim) for m in stage2.members}
    # the block's output, its projection shortcut, their norms, and the next stage's two readers
    assert {("layer2.0.conv2.weight", 0), ("layer2.0.bn2.weight", 0), ("layer2.0.bn2.bias", 0),
            ("layer2.0.downsample.0.weight", 0), ("layer2.0.downsample.1.weight", 0),
            ("layer3.0.conv1.weight", 1), ("layer3.0.downsample.0.weight", 1)} <= names
    assert stage2.size == 32
    assert graph.group_of("layer1.0.conv1").size == 16
    assert [b.reason for b in graph.boundaries()] == ["reaches the model's output"]


def test_vgg_attributes_follow_surgery():
    model = vgg_small()
    graph = DependencyGraph(model, torch.randn(1, 3, 32, 32))
    g = graph.group_of("features.0")
    remove_channels(graph, {g.index: torch.tensor([0, 5, 9])})
    conv0, bn, conv1 = model.features[0], model.features[1], model.features[4]
    assert conv0.out_channels == 29 and conv0.weight.shape[0] == 29
    assert bn.num_features == 29 and bn.running_mean.shape == (29,)
    assert conv1.in_channels == 29 and conv1.weight.shape[1] == 29
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(RuntimeError, match="before surgery"):
        graph.groups()


# --- one small model per operation ---------------------------------------------------------------

IMAGE = (2, 3, 6, 6)


def test_channel_shuffle_couples_one_channel_per_shuffle_group():
    model = ChannelShuffleNet(groups=3)
    x = torch.randn(*IMAGE)
    graph = DependencyGraph(model, x)
    g = graph.group_of("conv1")
    assert g.size == 4  # 12 channels in a 3 x 4 grid: removing one removes a whole column
    member = next(m for m in g.members if m.name == "conv1.weight")
    assert sorted(member.index[member.channel == member.channel[0]].tolist()) == [0, 4, 8]
    reader = next(m for m in g.members if m.name == "conv2.weight")
    # channel j*3+i of the shuffled tensor is conv1's channel i*4+j
    assert sorted(reader.index[reader.channel == member.channel[0]].tolist()) == [0, 1, 2]
    check_equivalence(ChannelShuffleNet(groups=3), x)
    pruned = ChannelShuffleNet(groups=3)
    check_equivalence(pruned, x, fraction=0.5)
    assert pruned.conv1.out_channels == 6 and pruned.conv2.in_channels == 6


def test_channel_shuffle_module():
    check_equivalence(ShuffleModuleNet(), torch.randn(*IMAGE))


def test_chunk_couples_positions_across_chunks():
    model = ChunkNet()
    x = torch.randn(*IMAGE)
    graph = DependencyGraph(model, x)
    g = graph.group_of("conv1")
    assert g.size == 4
    w = next(m for m in g.members if m.name == "conv1.weight")
    assert sorted(w.index[w.channel == 0].tolist()) == [0, 4]
    readers = {m.name: m for m in g.members if "in" in m.roles}
    assert set(readers) == {"left.weight", "right.weight"}
    check_equivalence(model, x)
    assert model.conv1.out_channels % 2 == 0 and model.left.in_channels == model.conv1.out_channels // 2


def test_split_by_computed_size_is_prunable_and_fixed_sizes_are_pinned():
    model = SplitNet()
    x = torch.randn(*IMAGE)
    graph = DependencyGraph(model, x)
    assert graph.group_of("conv1").size == 4
    with pytest.raises(ValueError, match="not prunable"):
        graph.group_of("conv2")
    assert any("split with sizes written in forward()" in b.reason for b in graph.boundaries())
    check_equivalence(model, x)
    assert model.conv2.out_channels == 6


def test_cat_offsets_map_each_input_to_its_block():
    model = CatNet()
    x = torch.randn(*IMAGE)
    graph = DependencyGraph(model, x)
    a, b = graph.group_of("a"), graph.group_of("b")
    reader_a = next(m for m in a.members if m.name == "merge.weight")
    reader_b = next(m for m in b.members if m.name == "merge.weight")
    assert reader_a.index.tolist() == list(range(3, 9)) and reader_b.index.tolist() == list(range(9, 14))
    check_equivalence(model, x)
    assert model.merge.in_channels == 3 + model.a.out_channels + model.b.out_channels


def test_depthwise_multiplier_and_grouped_convolutions():
    model = DepthwiseNet()
    x = torch.randn(*IMAGE)
    check_equivalence(model, x, fraction=0.5)
    assert model.dw.groups == model.dw.in_channels == model.dw.out_channels == model.pw1.out_channels
    assert model.dw2.groups == model.dw2.in_channels and model.dw2.out_channels == 2 * model.dw2.in_channels
    assert model.gconv.groups == 4 and model.gconv.in_channels % 4 == 0 and model.gconv.out_channels % 4 == 0


def test_conv_transpose():
    model = TransposeNet()
    check_equivalence(model, torch.randn(2, 3, 8, 8))
    assert model.up.in_channels == model.conv.out_channels and model.up.out_channels == model.bn.num_features


def test_conv1d_and_conv3d():
    model = Conv1d3dNet()
    check_equivalence(model, (torch.randn(2, 2, 10), torch.randn(2, 1, 4, 4, 4)))
    assert model.c2.in_channels == model.b1.num_features == model.c1.out_channels < 6
    assert model.d2.in_channels == model.b3.num_features == model.d1.out_channels < 5


def test_layer_group_and_instance_norm():
    model = NormsNet()
    x = torch.randn(*IMAGE)
    graph = DependencyGraph(model, x)
    gn = graph.group_of("c2")
    assert gn.size == 4  # GroupNorm(4, 12): a normalisation group goes whole
    check_equivalence(model, x, fraction=0.5)
    assert model.gn.num_groups == 2 and model.gn.num_channels == 6
    assert model.inorm.num_features == model.c3.out_channels == model.inorm.weight.shape[0]
    assert model.ln.normalized_shape == (6, 6)  # normalises the spatial dims: untouched


def test_layer_norm_over_channels_pins_them():
    model = ChannelLayerNormNet()
    x = torch.randn(2, 5, 6)
    graph = DependencyGraph(model, x)
    assert [g.name for g in graph.groups()] == ["fc1"]
    assert any("LayerNorm normalises" in b.reason for b in graph.boundaries())
    check_equivalence(model, x)


def test_embedding_dimension():
    model = EmbeddingNet()
    check_equivalence(model, torch.randint(0, 20, (2, 7)))
    assert model.emb.embedding_dim == model.fc1.in_features < 8 and model.emb.num_embeddings == 20


def test_tied_weights_stay_tied():
    model = TiedNet()
    check_equivalence(model, torch.randint(0, 20, (2, 7)))
    assert model.head.weight is model.emb.weight
    assert model.emb.weight.shape[1] == model.fc1.in_features == model.fc2.out_features < 8


def test_shared_module_couples_its_callers():
    model = SharedConvNet()
    x = torch.randn(*IMAGE)
    graph = DependencyGraph(model, x)
    g = graph.group_of("stem_a")
    assert {"stem_a.weight", "stem_b.weight", "shared.weight"} <= {m.name for m in g.members}
    check_equivalence(model, x)


def test_flatten_to_linear_removes_blocks_of_features():
    model = FlattenNet()
    x = torch.randn(2, 1, 8, 8)
    graph = DependencyGraph(model, x)
    g = graph.group_of("conv")
    reader = next(m for m in g.members if m.name == "fc1.weight")
    assert reader.index[reader.channel == 1].tolist() == list(range(16, 32))
    check_equivalence(model, x)
    assert model.fc1.in_features == model.conv.out_channels * 16


def test_parameters_used_directly():
    model = RawParamNet()
    x = torch.randn(*IMAGE)
    graph = DependencyGraph(model, x)
    names = [{m.name for m in g.members} for g in graph.groups()]
    assert {"k", "kb", "scale", "w1"} in names and {"w1", "b1", "w2"} in names
    check_equivalence(model, x)
    assert model.k.shape[0] == model.scale.shape[1] == model.w1.shape[1] < 6


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads(batch_first):
    model = MHANet(batch_first)
    x = torch.randn(2, 5, 5) if batch_first else torch.randn(5, 2, 5)
    graph = DependencyGraph(model, x)
    heads = graph.group_of("attn")
    assert heads.size == 4
    w = next(m for m in heads.members if m.name == "attn.in_proj_weight")
    # head 1 owns rows 2-3 of q, k and v
    assert sorted(w.index[w.channel == 1].tolist()) == [2, 3, 10, 11, 18, 19]
    check_equivalence(model, x, fraction=0.5)
    assert isinstance(model.attn, PrunedMultiheadAttention) and model.attn.num_heads == 2


def test_pruned_multihead_attention_matches_torch_before_any_removal():
    torch.manual_seed(0)
    for kwargs in [dict(batch_first=True), dict(add_bias_kv=True, add_zero_attn=True), dict(kdim=3, vdim=4)]:
        ref = nn.MultiheadAttention(8, 2, **kwargs).eval()
        ours = copy.deepcopy(ref)
        ours.__class__ = PrunedMultiheadAttention
        bf = kwargs.get("batch_first", False)
        q = torch.randn(2, 5, 8) if bf else torch.randn(5, 2, 8)
        k = torch.randn(2, 6, kwargs.get("kdim", 8)) if bf else torch.randn(6, 2, kwargs.get("kdim", 8))
        v = torch.randn(2, 6, kwargs.get("vdim", 8)) if bf else torch.randn(6, 2, kwargs.get("vdim", 8))
        mask = torch.rand(5, 6) > 0.7
        mask[:, 0] = False
        kpm = torch.zeros(2, 6, dtype=torch.bool)
        kpm[1, -1] = True
        for avg in (True, False):
            a = ref(q, k, v, key_padding_mask=kpm, attn_mask=mask, average_attn_weights=avg)
            b = ours(q, k, v, key_padding_mask=kpm, attn_mask=mask, average_attn_weights=avg)
            assert (a[0] - b[0]).abs().max() < 1e-5 and (a[1] - b[1]).abs().max() < 1e-5


def test_residual_multiply_and_squeeze_excitation():
    model = GateNet()
    x = torch.randn(*IMAGE)
    graph = DependencyGraph(model, x)
    g = graph.group_of("a")
    assert {"a.weight", "g.weight", "se2.weight", "se1.weight", "out.weight"} <= {m.name for m in g.members}
    check_equivalence(model, x)


def test_pixel_shuffle():
    model = PixelShuffleNet()
    check_equivalence(model, torch.randn(*IMAGE))
    assert model.conv.out_channels == 4 * model.conv2.in_channels


# --- masks agree with surgery ----------------------------------------------------------------------


@pytest.mark.parametrize("make,shape", [(resnet8, (2, 3, 16, 16)), (vgg_small, (2, 3, 16, 16)),
                                        (MHANet, (2, 5, 5)), (NormsNet, IMAGE), (DepthwiseNet, IMAGE)])
def test_channel_masks_compute_what_surgery_computes(make, shape):
    model = make().eval()
    _randomise_norms(model)
    x = torch.randn(*shape)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    graph = DependencyGraph(masked, x)
    removal = _choose(graph, 0.5)
    masks = channel_masks(graph, removal)
    # norm biases are masked too: that is what makes the masked model agree
    assert any(name.endswith("bias") and isinstance(masked.get_submodule(name.rpartition(".")[0]),
                                                    (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d))
               for name in masks) or make is MHANet
    for name, keep in masks.items():
        pk.masking.attach(masked, name, keep)
    remove_channels(DependencyGraph(pruned, x), removal)
    with torch.no_grad():
        assert (masked(x) - pruned(x)).abs().max() < TOL


# --- errors and boundaries -------------------------------------------------------------------------


class _FFTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.fft.fft2(self.conv(x)).real
        return self.fc(y.mean((2, 3)))


class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.inp(x)))
        return self.fc(out[:, -1])


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_unknown_operation_is_a_clear_error_naming_op_and_node():
    with pytest.raises(UnsupportedOperationError, match=r"fft2.*node 'fft_fft2'.*unknown='boundary'"):
        DependencyGraph(_FFTNet(), torch.randn(1, 3, 6, 6))
    with pytest.raises(UnsupportedOperationError, match=r"module 'rnn'.*register_rule\(LSTM"):
        DependencyGraph(_LSTMNet(), torch.randn(2, 4, 3))


def test_unknown_operation_as_boundary_pins_its_inputs():
    model = _LSTMNet()
    x = torch.randn(2, 4, 3)
    graph = DependencyGraph(model, x, unknown="boundary")
    assert graph.groups() == []
    assert any("no rule" in b.reason for b in graph.boundaries())
    model2 = _FFTNet()
    graph2 = DependencyGraph(model2, torch.randn(1, 3, 6, 6), unknown="boundary")
    assert all("conv" not in g.producers for g in graph2.groups())


def test_untraceable_model_is_a_clear_error_with_tracer_fx():
    with pytest.raises(UnsupportedOperationError, match="torch.fx cannot trace _Branchy"):
        DependencyGraph(_Branchy(), torch.randn(2, 3), tracer="fx")


def test_outputs_and_excluded_layers_keep_their_size():
    model = vgg_small()
    x = torch.randn(1, 3, 16, 16)
    graph = DependencyGraph(model, x, exclude=["features.4"])
    producers = {p for g in graph.groups() for p in g.producers}
    assert "features.4" not in producers and "features.0" not in producers  # features.0 feeds it
    assert "classifier" not in producers
    with pytest.raises(ValueError, match="exclude pattern 'nope'"):
        DependencyGraph(model, x, exclude=["nope"])
    with pytest.raises(ValueError, match="cannot be removed"):
        graph.channels_of("classifier", [0])


class Gain(nn.Module):
    """A user layer: a per-channel gain, kept whole and described by a registered rule."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.gain.view(1, -1, 1, 1)


def _gain_rule(ctx):
    x = ctx.dims(ctx.raw(0))
    ctx.consume(ctx.tensor(ctx.module, "gain"), 0, x.get(1), "through")
    return dict(x)


def _gain_resize(module, sizes):
    module.channels = module.gain.shape[0]


def test_registered_rule_for_a_user_layer():
    register_rule(Gain, _gain_rule, _gain_resize, attributes=("channels",))
    model = nn.Sequential(nn.Conv2d(3, 6, 3), Gain(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    assert graph.fx_graph.find_nodes(op="call_module", target="1")  # kept whole
    assert {"0.weight", "1.gain", "3.weight"} <= {m.name for m in graph.group_of("0").members}
    check_equivalence(model, x)
    assert model[1].channels == model[0].out_channels < 6


def test_removing_every_channel_is_refused_before_any_change():
    model = vgg_small()
    x = torch.randn(1, 3, 16, 16)
    graph = DependencyGraph(model, x)
    g = graph.group_of("features.0")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="leave the layer empty"):
        remove_channels(graph, {g.index: torch.arange(g.size)})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_functional_ops_without_parameters_follow_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.b = nn.Conv2d(6, 4, 3, padding=1)

        def forward(self, x):
            y = F.max_pool2d(F.silu(self.a(x)), 2).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
            y = torch.flip(y, [1]) + F.interpolate(y, scale_factor=1.0)
            return self.b(F.dropout(y, 0.1, training=False)).mean((2, 3))

    check_equivalence(Net(), torch.randn(2, 3, 8, 8))


class _GroupedTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.t = nn.ConvTranspose2d(8, 6, 3, padding=1, groups=2)
        self.d = nn.ConvTranspose2d(6, 6, 3, padding=1, groups=6)
        self.o = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.o(torch.relu(self.d(torch.relu(self.t(torch.relu(self.c(x))))))).mean((2, 3))


def test_grouped_and_depthwise_conv_transpose():
    model = _GroupedTranspose()
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    assert [(g.name, g.size) for g in graph.groups()] == [("c", 4), ("t", 3)]  # positions within 2 groups
    check_equivalence(model, x, fraction=0.5)
    assert model.t.groups == 2 and model.t.in_channels == 4 and model.t.out_channels == 2
    assert model.d.groups == model.d.in_channels == model.d.out_channels == 2


class _StackFlip(nn.Module):
    """stack interleaves two branches; flip and repeat; a parameter expanded over the batch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.o = nn.Conv2d(12, 4, 1)
        self.fc = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x):
        a, b = torch.relu(self.a(x)), torch.relu(self.b(x))
        st = torch.stack([a, b], 2).flatten(1, 2)  # channels a0, b0, a1, b1, ...
        z = self.o(st) + self.o(st.flip(1)).repeat(1, 1, 1, 1)
        z = z * self.scale.expand(x.size(0), -1, -1, -1)
        return self.fc(F.pad(z, (1, 1, 1, 1)).mean((2, 3)))


def test_stack_flip_repeat_expand():
    model = _StackFlip()
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    branch = graph.group_of("a")
    # stack makes a_i and b_i one channel; the flipped reader makes channel i and 5-i one too
    assert branch.size == 3
    w = next(m for m in branch.members if m.name == "a.weight")
    assert sorted(w.index[w.channel == w.channel[0]].tolist()) == [0, 5]
    check_equivalence(model, x)


class _UserAttention(nn.Module):
    """Attention written by hand: heads reshaped to fixed sizes (pinned), the MLP stays prunable."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.o = nn.Linear(8, 6)
        self.fc = nn.Linear(6, 12)
        self.out = nn.Linear(12, 2)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, 2, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
        h = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 8))
        mixed = torch.softmax(h @ h.transpose(1, 2), -1) @ h
        return self.out(torch.relu(self.fc(mixed))).mean(1)


def test_hand_written_attention_is_followed_conservatively():
    model = _UserAttention()
    x = torch.randn(2, 5, 6)
    graph = DependencyGraph(model, x)
    assert [g.name for g in graph.groups()] == ["fc"]
    reasons = " ".join(b.reason for b in graph.boundaries())
    assert "sizes written in forward()" in reasons and "not a channel dimension" in reasons
    check_equivalence(model, x)


class _FunctionalTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.wt = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)  # (in, out / groups, k, k), groups=2
        self.bt = nn.Parameter(torch.randn(6) * 0.1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = torch.relu(F.conv2d(x, self.w1, padding=1))
        y = torch.relu(F.conv_transpose2d(y, self.wt, self.bt, 1, 1, 0, 2))
        return self.head(y).mean((2, 3))


def test_functional_grouped_conv_transpose():
    model = _FunctionalTranspose()
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    assert sorted(g.size for g in graph.groups()) == [2, 3]
    check_equivalence(model, x, fraction=0.5)
    assert model.wt.shape == (2, 1, 3, 3) and model.head.in_channels == 2  # one position per group left
