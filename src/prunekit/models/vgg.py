"""Small VGG-style networks with a global-average-pool head (any input size from 8x8 up)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._init import kaiming_init_

__all__ = ["VGG", "VGG_SMALL_CFG", "VGG11_CFG", "vgg_small", "vgg11"]

VGG_SMALL_CFG: tuple[int | str, ...] = (32, "M", 64, "M", 128, 128, "M", 256)
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG: ``features`` (Conv3x3(pad 1) [-BN] -ReLU blocks and 2x2 max pools), global average pool,
    and a single linear ``classifier``.

    ``cfg`` lists output channels for each conv and ``"M"`` for a max pool. Pools use
    ``ceil_mode=True``, which equals the usual floor mode on even sizes and keeps a 1x1 map at 1x1,
    so the 5-pool VGG-11 still runs on 8x8 inputs.
    """

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG_SMALL_CFG,
        in_channels: int = 3,
        num_classes: int = 10,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            if not isinstance(item, int) or item < 1:
                raise ValueError(f"VGG cfg entries must be positive ints or 'M', got {item!r}")
            layers.append(nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU())
            channels = item
        if not any(isinstance(m, nn.Conv2d) for m in layers):
            raise ValueError("VGG cfg needs at least one convolution")
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg_small(in_channels: int = 3, num_classes: int = 10, batch_norm: bool = True) -> VGG:
    """A small VGG (``32, M, 64, M, 128, 128, M, 256``), about 0.54M parameters (3 input channels, 10 classes)."""
    return VGG(VGG_SMALL_CFG, in_channels=in_channels, num_classes=num_classes, batch_norm=batch_norm)


def vgg11(in_channels: int = 3, num_classes: int = 10, batch_norm: bool = True) -> VGG:
    """VGG-11 (configuration "A") for 32x32 images, with a global-average-pool linear head."""
    return VGG(VGG11_CFG, in_channels=in_channels, num_classes=num_classes, batch_norm=batch_norm)
