"""Built-in reference models and a small name registry.

Every model is a plain ``nn.Module`` whose weights come from torch's global RNG: call
``torch.manual_seed`` before building one to make it reproducible.

>>> model = get_model("lenet5", in_channels=1, image_size=8)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..registry import Registry

from .lenet import LeNet5
from .mlp import LeNet300100, TinyMLP
from .resnet import BasicBlock, ResNet, resnet8, resnet20
from .vgg import VGG, VGG11_CFG, VGG_SMALL_CFG, vgg11, vgg_small

__all__ = [
    "MODELS",
    "get_model",
    "LeNet300100",
    "TinyMLP",
    "LeNet5",
    "VGG",
    "VGG_SMALL_CFG",
    "VGG11_CFG",
    "vgg_small",
    "vgg11",
    "BasicBlock",
    "ResNet",
    "resnet8",
    "resnet20",
]

def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


#: the built-in models by name (case, ``-`` and ``_`` ignored on lookup)
MODELS: Registry[Callable[..., nn.Module]] = Registry("model", normalize=_canonical)
MODELS.add("lenet300100", LeNet300100, "LeNet-300-100: MLP with hidden layers of 300 and 100 (LeCun et al. 1998)")
MODELS.add("lenet5", LeNet5, "LeNet-5: two 5x5 convolutions with pooling, three fully connected layers")
MODELS.add("vgg_small", vgg_small, "a small VGG (32, M, 64, M, 128, 128, M, 256), about 0.54M parameters")
MODELS.add("vgg11", vgg11, "VGG-11 (configuration A) for 32x32 images, global-average-pool linear head")
MODELS.add("resnet8", resnet8, "CIFAR-style ResNet-8, one basic block per stage (He et al. 2016)")
MODELS.add("resnet20", resnet20, "CIFAR-style ResNet-20, three basic blocks per stage (He et al. 2016)")
MODELS.add("tiny_mlp", TinyMLP, "a two-layer MLP for fast tests")


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build the registered model ``name`` (case, ``-`` and ``_`` ignored) with ``kwargs``.

    Raises:
        ValueError: for an unknown name; the message suggests the closest known name.
    """
    return MODELS.get(name)(**kwargs)
