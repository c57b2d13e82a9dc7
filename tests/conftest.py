"""Shared test setup: one thread, a fixed seed per test, and one trained LeNet-300-100 for the whole session."""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@dataclass(frozen=True)
class TrainedLeNet:
    """LeNet-300-100 trained on digits once per session; tests take copies (``trained_lenet``)."""

    model: nn.Module
    steps: int  # optimizer steps the training took
    accuracy: float  # test accuracy of ``model``


@pytest.fixture(scope="session")
def lenet_digits() -> TrainedLeNet:
    """LeNet-300-100 (64 inputs, 10 classes) after 15 epochs of Adam at lr 1e-3 on digits, batch 64, seed 0."""
    from prunekit.data import digits, evaluate, loaders, train
    from prunekit.models import LeNet300100

    torch.manual_seed(0)
    train_loader, test_loader = loaders(*digits(), batch_size=64, seed=0)
    model = LeNet300100(in_features=64, num_classes=10)
    steps = train(model, train_loader, epochs=15, lr=1e-3)
    model.eval()
    return TrainedLeNet(model, steps, evaluate(model, test_loader))


@pytest.fixture
def trained_lenet(lenet_digits) -> nn.Module:
    """A fresh copy of the session's trained LeNet-300-100: change it freely."""
    return copy.deepcopy(lenet_digits.model)


@pytest.fixture
def digits_loaders():
    """``(train_loader, test_loader)`` of digits, batch 64, shuffled with seed 0 (as ``lenet_digits`` was trained)."""
    from prunekit.data import digits, loaders

    return loaders(*digits(), batch_size=64, seed=0)
