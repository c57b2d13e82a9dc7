"""A model factory for recipes: ``model: {factory: "my_model:build", kwargs: {...}}``.

Any importable ``module:function`` (or ``file.py:function``, relative to the recipe) that returns an
``nn.Module`` works; the recipe's ``model.kwargs`` are passed to it.
"""

from torch import nn


def build(in_features: int = 64, hidden: int = 128, num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    """A two-hidden-layer MLP for 8x8 digits."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
