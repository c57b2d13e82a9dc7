"""Fully connected reference models: LeNet-300-100 and a tiny MLP for fast tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LeNet300100", "TinyMLP"]


class LeNet300100(nn.Module):
    """The classic LeNet-300-100 MLP (LeCun et al. 1998; Han et al. 2015).

    ``fc1`` (``in_features`` -> 300) - ReLU - ``fc2`` (300 -> 100) - ReLU - ``fc3`` (100 -> classes).
    Any input shape ``(N, ...)`` is flattened to ``(N, in_features)``.
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class TinyMLP(nn.Module):
    """A two-layer MLP for fast tests: ``fc1`` (``in_features`` -> ``hidden``) - ReLU - ``fc2``.

    Any input shape ``(N, ...)`` is flattened to ``(N, in_features)``.
    """

    def __init__(self, in_features: int = 64, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))
