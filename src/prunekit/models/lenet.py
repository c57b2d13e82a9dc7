"""LeNet-5, sized from the input image so it runs on 8x8 digits and 32x32 images alike."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._init import kaiming_init_

__all__ = ["LeNet5"]


def _conv_pool_size(size: int, padding: int) -> int:
    """Spatial size after a 5x5 conv with ``padding`` followed by a 2x2 max pool."""
    return (size + 2 * padding - 4) // 2


class LeNet5(nn.Module):
    """LeNet-5: conv(6, 5x5) - ReLU - pool - conv(16, 5x5) - ReLU - pool - fc 120 - fc 84 - fc classes.

    Args:
        in_channels: input channels (1 for digits, 3 for colour images).
        num_classes: output logits.
        image_size: side of the (square) input image; sets the flattened size fed to ``fc1``.
        padding: padding of both convolutions. ``None`` picks the classic geometry for images of 32
            pixels or more (no padding: 32 -> 28 -> 14 -> 10 -> 5) and ``padding=2`` for smaller ones
            (8 -> 8 -> 4 -> 4 -> 2), so that 8x8 digits fit.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 8,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = 0 if image_size >= 32 else 2
        side = _conv_pool_size(_conv_pool_size(image_size, padding), padding)
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for LeNet5 with padding={padding}")
        self.image_size = image_size
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, padding=padding)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)
