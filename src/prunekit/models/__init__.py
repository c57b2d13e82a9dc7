"""Built-in reference models and a small name registry.

Every model is a plain ``nn.Module`` whose weights come from torch's global RNG: call
``torch.manual_seed`` before building one to make it reproducible.

>>> model = get_model("lenet5", in_channels=1, image_size=8)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

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

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300100": LeNet300100,
    "lenet5": LeNet5,
    "vgg_small": vgg_small,
    "vgg11": vgg11,
    "resnet8": resnet8,
    "resnet20": resnet20,
    "tiny_mlp": TinyMLP,
}


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build the registered model ``name`` (case, ``-`` and ``_`` ignored) with ``kwargs``.

    Raises:
        ValueError: for an unknown name; the message suggests the closest known name.
    """
    by_canonical = {_canonical(key): key for key in MODELS}
    key = by_canonical.get(_canonical(name))
    if key is None:
        close = difflib.get_close_matches(_canonical(name), list(by_canonical), n=1, cutoff=0.5)
        hint = f" Did you mean {by_canonical[close[0]]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(MODELS)}.")
    return MODELS[key](**kwargs)
