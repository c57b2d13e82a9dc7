"""The eager tracer (structured/tracing.py) finds exactly the groups torch.fx finds, wherever fx works."""

from __future__ import annotations

import pytest
import torch

import prunekit as pk
from prunekit.models import get_model
from structured_models import (
    CatNet,
    ChannelLayerNormNet,
    ChannelShuffleNet,
    ChunkNet,
    Conv1d3dNet,
    DepthwiseNet,
    EmbeddingNet,
    FlattenNet,
    MHANet,
    PixelShuffleNet,
    PositionNet,
    RawParamNet,
    RopeAttentionNet,
    SharedConvNet,
    ShuffleModuleNet,
    SplitNet,
    StandardisedNet,
    TiedNet,
    TransposeNet,
)

IMAGE = (2, 3, 6, 6)
CASES = {
    "channel_shuffle": (ChannelShuffleNet, lambda: torch.randn(*IMAGE)),  # view to sizes computed from x.size()
    "shuffle_module": (ShuffleModuleNet, lambda: torch.randn(*IMAGE)),
    "chunk": (ChunkNet, lambda: torch.randn(*IMAGE)),
    "split": (SplitNet, lambda: torch.randn(*IMAGE)),
    "cat": (CatNet, lambda: torch.randn(*IMAGE)),
    "depthwise": (DepthwiseNet, lambda: torch.randn(*IMAGE)),
    "transpose": (TransposeNet, lambda: torch.randn(*IMAGE)),
    "conv1d3d": (Conv1d3dNet, lambda: (torch.randn(2, 2, 10), torch.randn(2, 1, 4, 4, 4))),
    "channel_layer_norm": (ChannelLayerNormNet, lambda: torch.randn(*IMAGE)),
    "embedding": (EmbeddingNet, lambda: torch.randint(0, 10, (2, 5))),
    "tied": (TiedNet, lambda: torch.randint(0, 10, (2, 5))),
    "shared": (SharedConvNet, lambda: torch.randn(*IMAGE)),
    "flatten": (FlattenNet, lambda: torch.randn(2, 1, 8, 8)),
    "raw_parameters": (RawParamNet, lambda: torch.randn(*IMAGE)),
    "mha": (MHANet, lambda: torch.randn(2, 5, 5)),
    "pixel_shuffle": (PixelShuffleNet, lambda: torch.randn(*IMAGE)),
    "standardised": (StandardisedNet, lambda: torch.randn(*IMAGE)),
    "rope_attention": (RopeAttentionNet, lambda: torch.randn(2, 5, 6)),
    "position": (PositionNet, lambda: torch.randn(2, 4, 5)),
    "resnet20": (lambda: get_model("resnet20"), lambda: torch.randn(2, 3, 32, 32)),
}


def _signature(graph) -> list:
    return sorted((g.size, sorted((m.name, m.dim, m.index.tolist(), m.channel.tolist()) for m in g.members))
                  for g in graph.groups())


@pytest.mark.parametrize("name", list(CASES))
def test_eager_trace_finds_the_groups_fx_finds(name):
    make, inputs = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    x = inputs()
    fx_graph = pk.structured.DependencyGraph(model, x, tracer="fx")
    eager = pk.structured.DependencyGraph(model, x, tracer="eager")
    assert _signature(eager) == _signature(fx_graph)
    assert sorted(b.channels for b in eager.boundaries()) == sorted(b.channels for b in fx_graph.boundaries())


def test_tracer_is_checked():
    with pytest.raises(ValueError, match="tracer must be"):
        pk.structured.DependencyGraph(torch.nn.Linear(2, 2), torch.randn(1, 2), tracer="jit")


def test_a_reshape_taking_its_channel_count_from_another_tensor_couples_the_two():
    class Windows(torch.nn.Module):  # Swin-style: the width of a view is read from the block's input
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            width = h.shape[-1]
            y = self.b(h).view(-1, 2, width)  # before the residual add that makes h and y one channel set
            return self.c(y.reshape(h.shape) + h)

    model = Windows()
    x = torch.randn(4, 4)
    graph = pk.structured.DependencyGraph(model, x)
    assert [g.size for g in graph.groups()] == [8]
    with torch.no_grad():
        for layer in (model.a, model.b):
            layer.weight[[2, 6]] = 0
            layer.bias[[2, 6]] = 0
    expected = model(x)
    pk.structured.remove(model, x, "a", [2, 6])
    assert model.b.in_features == model.b.out_features == model.c.in_features == 6
    torch.testing.assert_close(model(x), expected)
