"""CIFAR-style ResNets (He et al. 2016, section 4.2) with configurable widths."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._init import kaiming_init_

__all__ = ["BasicBlock", "ResNet", "resnet8", "resnet20"]


class BasicBlock(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU.

    The shortcut is the identity, or ``downsample`` (1x1 conv + BN projection) when the stride or the
    number of channels changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """CIFAR-style ResNet of depth ``6n + 2``: a 3x3 stem, three stages of ``n`` basic blocks (strides
    1, 2, 2) with ``widths`` channels, global average pool and a linear ``fc`` head.

    Modules: ``conv1, bn1, relu, layer1, layer2, layer3, avgpool, fc``. Works on any input from 8x8.
    """

    def __init__(
        self,
        depth: int = 20,
        widths: Sequence[int] = (16, 32, 64),
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        if len(widths) != 3:
            raise ValueError(f"ResNet needs three stage widths, got {tuple(widths)}")
        blocks = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[0], blocks, stride=1)
        self.layer2 = self._stage(widths[0], widths[1], blocks, stride=2)
        self.layer3 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        kaiming_init_(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def resnet8(
    in_channels: int = 3, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)
) -> ResNet:
    """ResNet-8 (one basic block per stage), about 78k parameters at the default widths."""
    return ResNet(8, widths, in_channels=in_channels, num_classes=num_classes)


def resnet20(
    in_channels: int = 3, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)
) -> ResNet:
    """ResNet-20 (three basic blocks per stage), about 0.27M parameters at the default widths."""
    return ResNet(20, widths, in_channels=in_channels, num_classes=num_classes)
