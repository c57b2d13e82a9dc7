"""Small models, one per operation the structured dependency graph supports (shared by the tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelShuffleNet(nn.Module):
    """ShuffleNet-style: view(b, g, c//g, h, w) -> transpose -> flatten back."""

    def __init__(self, groups: int = 3) -> None:
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        b, c, h, w = x.size()
        x = x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        x = F.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


class ShuffleModuleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.shuffle = nn.ChannelShuffle(2)
        self.conv2 = nn.Conv2d(8, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.conv2(self.shuffle(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class ChunkNet(nn.Module):
    """chunk into two branches, each convolved, concatenated again."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(4, 5, 3, padding=1)
        self.right = nn.Conv2d(4, 6, 1)
        self.out = nn.Conv2d(11, 7, 1)
        self.fc = nn.Linear(7, 2)

    def forward(self, x):
        a, b = torch.relu(self.conv1(x)).chunk(2, dim=1)
        y = torch.cat([torch.relu(self.left(a)), torch.relu(self.right(b))], dim=1)
        return self.fc(self.out(y).mean((2, 3)))


class SplitNet(nn.Module):
    """split with a size computed from the tensor (prunable) and with a fixed size (pinned)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(2, 3, 1)
        self.d = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(14, 2)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y1, y2 = torch.split(y, y.size(1) // 2, dim=1)
        z = torch.relu(self.conv2(x))
        z1, z2 = torch.split(z, [2, 4], dim=1)
        parts = [self.a(y1), self.b(y2), self.c(z1), self.d(z2)]
        return self.fc(torch.cat(parts, 1).mean((2, 3)))


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(3, 5, 1)
        self.merge = nn.Conv2d(3 + 6 + 5, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.cat([x, F.relu(self.bn_a(self.a(x))), torch.sigmoid(self.b(x))], dim=1)
        return self.fc(F.adaptive_avg_pool2d(self.merge(y), 1).flatten(1))


class DepthwiseNet(nn.Module):
    """MobileNet block: pointwise - depthwise (multiplier 1) - BN - pointwise; then a depthwise with
    multiplier 2 and a grouped convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.dw2 = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.gconv = nn.Conv2d(16, 12, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(12)
        self.pw2 = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu6(self.bn(self.dw(F.relu6(self.pw1(x)))))
        x = F.relu(self.bn2(self.gconv(F.relu(self.dw2(x)))))
        return self.fc(self.pw2(x).mean((2, 3)))


class TransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.up2(torch.relu(self.bn(self.up(torch.relu(self.conv(x))))))))


class Conv1d3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1)
        self.b1 = nn.BatchNorm1d(6)
        self.c2 = nn.Conv1d(6, 4, 3, padding=1)
        self.d1 = nn.Conv3d(1, 5, 3, padding=1)
        self.b3 = nn.BatchNorm3d(5)
        self.d2 = nn.Conv3d(5, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, seq, vol):
        s = self.c2(F.relu(self.b1(self.c1(seq)))).mean(2)
        v = self.d2(F.relu(self.b3(self.d1(vol)))).mean((2, 3, 4))
        return self.fc(torch.cat([s, v], 1))


class NormsNet(nn.Module):
    """LayerNorm over the spatial dims (channels pass), GroupNorm (whole norm groups go), InstanceNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm([6, 6])
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.gn = nn.GroupNorm(4, 12)
        self.c3 = nn.Conv2d(12, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(6, affine=True, track_running_stats=True)
        self.c4 = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        x = F.relu(self.ln(self.c1(x)))
        x = F.relu(self.gn(self.c2(x)))
        x = F.relu(self.inorm(self.c3(x)))
        return self.c4(x).mean((2, 3))


class ChannelLayerNormNet(nn.Module):
    """LayerNorm over the channels (transformer style): those channels are pinned, the hidden dim is not."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.ln(h + self.fc2(F.gelu(self.fc1(h))))
        return self.out(h)


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, tokens):
        return self.fc2(torch.relu(self.fc1(self.emb(tokens))).mean(1))


class TiedNet(nn.Module):
    """A language-model shape: embedding tied to the output head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


class SharedConvNet(nn.Module):
    """One conv applied to two inputs (shared parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_a = nn.Conv2d(3, 6, 3, padding=1)
        self.stem_b = nn.Conv2d(3, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        a = self.shared(torch.relu(self.stem_a(x)))
        b = self.shared(torch.relu(self.stem_b(x)))
        return self.fc((a * b).mean((2, 3)))


class FlattenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


class RawParamNet(nn.Module):
    """Parameters used directly: F.linear, F.conv2d, a per-channel scale, matmul with a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.kb = nn.Parameter(torch.randn(6) * 0.1)
        self.scale = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)
        self.w1 = nn.Parameter(torch.randn(10, 6) * 0.3)
        self.b1 = nn.Parameter(torch.randn(10) * 0.1)
        self.w2 = nn.Parameter(torch.randn(10, 7) * 0.3)
        self.w3 = nn.Parameter(torch.randn(3, 7) * 0.3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.k, self.kb, padding=1)) * self.scale
        h = F.relu(F.linear(x.mean((2, 3)), self.w1, self.b1))
        h = torch.tanh(h @ self.w2)
        return F.linear(h, self.w3)


class MHANet(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=batch_first)
        self.fc = nn.Linear(8, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(torch.relu(self.fc(h + a))).mean(1)


class GateNet(nn.Module):
    """Residual multiply (gating) and a squeeze-and-excitation block."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(3, 8, 3, padding=1)
        self.se1 = nn.Linear(8, 4)
        self.se2 = nn.Linear(4, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x) * torch.sigmoid(self.g(x))
        s = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3))))))
        y = y * s[:, :, None, None]
        return self.out(y).mean((2, 3))


class PixelShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.ps = nn.PixelShuffle(2)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.ps(torch.relu(self.conv(x)))).mean((2, 3))


# --- subclasses with their own forward, parameters used directly (issue 11) -------------------------


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm (timm/ConvNeXt): normalises dim 1 of NCHW, keeps ``normalized_shape``."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class StdConv2d(nn.Conv2d):
    """Weight standardisation (Qiao et al. 2019): each filter standardised over its input channels and
    kernel, so an input channel's removal changes every filter's mean and variance."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.var(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d (NF-Nets): standardisation through F.batch_norm with a learnable gain, a
    parameter used directly."""

    def __init__(self, *args, gain_init: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = self.weight[0].numel() ** -0.5
        self.eps = 1e-6

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GainStdConv2d(nn.Conv2d):
    """Weight standardisation with a per-filter gain (NF-Net style) written with sizes that follow the
    tensor: the gain is part of the filter's group."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5) * self.gain
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StandardisedNet(nn.Module):
    """Weight-standardised convolutions with and without gains, each followed by a plain convolution, a
    channels-first LayerNorm and a gamma scaling its output (a parameter used directly)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.ws = StdConv2d(10, 12, 3, padding=1)
        self.mid = nn.Conv2d(12, 10, 1)
        self.gained = GainStdConv2d(10, 8, 3, padding=1)
        self.mid2 = nn.Conv2d(8, 8, 1)
        self.scaled = ScaledStdConv2d(8, 9, 1)
        self.norm = LayerNorm2d(9)
        self.gamma = nn.Parameter(torch.rand(9, 1, 1) + 0.5)
        self.conv = nn.Conv2d(9, 7, 1)
        self.fc = nn.Linear(7, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.mid(F.relu(self.ws(x))))
        x = F.relu(self.mid2(F.relu(self.gained(x))))
        x = self.norm(self.scaled(x)) * self.gamma
        x = F.relu(self.conv(x))
        return self.fc(x.mean((2, 3)))


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RopeAttentionNet(nn.Module):
    """EVA-style attention: one qkv Linear whose bias is ``torch.cat((q_bias, zeros, v_bias))`` built at
    run time, rotary position embedding on queries and keys, a layer-scale gamma, a residual stream and an
    MLP."""

    def __init__(self, dim: int = 16, heads: int = 2, tokens: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)  # layer scale
        self.fc1 = nn.Linear(dim, 24)
        self.fc2 = nn.Linear(24, dim)
        self.head = nn.Linear(dim, 3)
        head_dim = dim // heads
        angles = torch.arange(tokens)[:, None] * (10000 ** (-torch.arange(head_dim // 2) / (head_dim // 2)))[None]
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, x):
        h = self.embed(x)
        b, n, _ = h.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(h, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.cos + _rotate_half(q) * self.sin
        k = k * self.cos + _rotate_half(k) * self.sin
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        h = h + self.gamma * self.proj(a)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


class PositionNet(nn.Module):
    """A learned position embedding added to the tokens (a parameter used directly, part of the residual
    group), and a relative-position bias table indexed by a buffer and added to per-head attention scores
    (advanced indexing: the table pins what it touches)."""

    def __init__(self, dim: int = 12, heads: int = 3, tokens: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(5, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        idx = torch.arange(tokens)
        self.register_buffer("index", idx[:, None] - idx[None] + tokens - 1)
        self.fc = nn.Linear(dim, 10)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        h = self.embed(x) + self.pos
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5 + self.table[self.index].permute(2, 0, 1)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        h = h + self.o(a)
        return self.head(torch.relu(self.fc(h)).mean(1))
