"""Built-in data and the plain training helpers shared by the demo, the tests and the examples.

* :func:`digits`: scikit-learn's bundled 8x8 digits (no download), split once, deterministically.
* :func:`synthetic_classification`, :func:`synthetic_images`: small seeded tasks for fast tests.
* :func:`loaders`: seeded data loaders; :func:`train` and :func:`evaluate`: a minimal loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .modules import eval_mode, training_mode

__all__ = [
    "digits",
    "loaders",
    "synthetic_classification",
    "synthetic_images",
    "train",
    "evaluate",
    "make_optimizer",
]


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``(features in [0, 1] float32 (1797, 64), labels int64)``, loaded once."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            'prunekit.data.digits needs scikit-learn: pip install "prunekit[demo]"'
        ) from exc
    bunch = load_digits()
    features = (bunch.data / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    features.setflags(write=False)
    labels.setflags(write=False)
    return features, labels


@functools.lru_cache(maxsize=8)
def _digits_split(split_seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    labels = _digits_arrays()[1]
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=split_seed
    )
    return np.sort(train_idx), np.sort(test_idx)


def digits(
    split_seed: int = 0, test_fraction: float = 0.2, image: bool = False
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 handwritten digits (1797 samples, 10 classes) as ``(train, test)``.

    Features are scaled to [0, 1] (float32), labels are int64. The split is stratified and fixed by
    ``split_seed``. With ``image=True`` inputs are shaped ``(N, 1, 8, 8)``, otherwise ``(N, 64)``.
    Arrays and splits are cached in-process, so repeated calls are cheap.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    features, labels = _digits_arrays()
    shape = (-1, 1, 8, 8) if image else (-1, 64)

    def subset(idx: np.ndarray) -> TensorDataset:
        # fancy indexing copies, so the cached arrays are never shared with the caller
        return TensorDataset(
            torch.from_numpy(features[idx]).reshape(shape), torch.from_numpy(labels[idx])
        )

    train_idx, test_idx = _digits_split(int(split_seed), float(test_fraction))
    return subset(train_idx), subset(test_idx)


def _split(
    inputs: Tensor, labels: Tensor, test_fraction: float, generator: torch.Generator
) -> tuple[TensorDataset, TensorDataset]:
    """A random split stratified by label, with ``round(n * test_fraction)`` test samples.

    Each class gives ``floor(n_c * test_fraction)`` test samples; the few left over go to the classes
    with the largest fractional remainders, so both sides keep the class balance.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * test_fraction
    n_test = quota.floor().long()
    leftover = round(len(labels) * test_fraction) - int(n_test.sum())
    n_test[torch.argsort(quota - n_test, descending=True, stable=True)[:leftover]] += 1
    train_parts, test_parts = [], []
    for cls, k in zip(classes, n_test.tolist()):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        test_parts.append(idx[:k])
        train_parts.append(idx[k:])
    train_idx, test_idx = torch.cat(train_parts).sort().values, torch.cat(test_parts).sort().values
    return (
        TensorDataset(inputs[train_idx], labels[train_idx]),
        TensorDataset(inputs[test_idx], labels[test_idx]),
    )


def _balanced_labels(n: int, classes: int, generator: torch.Generator) -> Tensor:
    if classes < 2:
        raise ValueError(f"need at least 2 classes, got {classes}")
    if n < 2 * classes:
        raise ValueError(f"n={n} is too small for {classes} classes")
    labels = torch.arange(n) % classes
    return labels[torch.randperm(n, generator=generator)]


def synthetic_classification(
    n: int = 1024,
    features: int = 20,
    classes: int = 4,
    informative: int | None = None,
    class_sep: float = 1.0,
    noise: float = 1.0,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[TensorDataset, TensorDataset]:
    """A Gaussian-blobs classification task as ``(train, test)``, fully determined by ``seed``.

    Each class has a centroid drawn from ``N(0, class_sep**2)`` on the first ``informative`` features
    (all of them when ``None``); samples are the centroid plus ``N(0, noise**2)`` noise, and the other
    features are pure ``N(0, 1)`` noise. Labels are balanced and the split is stratified.
    """
    informative = features if informative is None else informative
    if not 1 <= informative <= features:
        raise ValueError(f"informative must be in [1, features={features}], got {informative}")
    gen = torch.Generator().manual_seed(seed)
    labels = _balanced_labels(n, classes, gen)
    centroids = torch.randn(classes, informative, generator=gen) * class_sep
    inputs = torch.randn(n, features, generator=gen)
    inputs[:, :informative] = centroids[labels] + noise * inputs[:, :informative]
    return _split(inputs, labels, test_fraction, gen)


def synthetic_images(
    n: int = 512,
    channels: int = 3,
    size: int = 32,
    classes: int = 4,
    noise: float = 1.0,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[TensorDataset, TensorDataset]:
    """Noisy oriented gratings as ``(train, test)`` images ``(N, channels, size, size)``.

    Class ``k`` is a sinusoidal grating (period 4 pixels) at orientation ``pi * k / classes``, with a
    random phase and random positive per-channel amplitudes per sample, plus ``N(0, noise**2)`` pixel
    noise. Only the orientation carries the label (not the position, colour or mean intensity), so a
    small convnet with a global pooling head learns it in a few epochs. Fully determined by ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = _balanced_labels(n, classes, gen)
    angle = math.pi * labels.float() / classes
    phase = 2 * math.pi * torch.rand(n, generator=gen)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = 2 * math.pi / 4.0
    proj = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
    grating = torch.sin(freq * proj + phase[:, None, None])  # (n, size, size)
    amplitude = 0.5 + torch.rand(n, channels, generator=gen)  # colour carries no label information
    images = amplitude[:, :, None, None] * grating[:, None]
    images = images + noise * torch.randn(images.shape, generator=gen)
    return _split(images, labels, test_fraction, gen)


# --------------------------------------------------------------------------------------------------
# Loaders, training and evaluation
# --------------------------------------------------------------------------------------------------


def loaders(
    train: TensorDataset, test: TensorDataset, batch_size: int = 64, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)``: the train loader shuffles with a generator seeded by
    ``seed`` (same seed, same batch order); the test loader keeps the dataset order."""
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False)
    return train_loader, test_loader


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


_DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}


def make_optimizer(
    model: nn.Module, name: str = "adam", lr: float | None = None, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``"adam"`` (default lr 1e-3) or ``"sgd"`` (momentum 0.9, default lr 0.05) over the trainable
    parameters."""
    key = name.lower()
    if key not in _DEFAULT_LR:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")
    lr = _DEFAULT_LR[key] if lr is None else lr
    params = [p for p in model.parameters() if p.requires_grad]
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def train(
    model: nn.Module,
    loader: DataLoader,
    epochs: int = 1,
    lr: float | None = None,
    optimizer: str | torch.optim.Optimizer = "adam",
    weight_decay: float = 0.0,
    callback: Callable[[int], object] | None = None,
) -> int:
    """Train ``model`` with cross-entropy for ``epochs`` passes over ``loader``.

    Args:
        optimizer: ``"adam"`` (default lr 1e-3), ``"sgd"`` (momentum 0.9, default lr 0.05), or a
            ready-made optimizer (then ``lr`` and ``weight_decay`` are ignored).
        callback: called as ``callback(step)`` after every optimizer step, ``step`` counting from 1;
            this is where a pruning schedule (``Pruner.step``) plugs in.

    Returns:
        The number of optimizer steps taken. The model's training mode is restored afterwards.
    """
    opt = make_optimizer(model, optimizer, lr, weight_decay) if isinstance(optimizer, str) else optimizer
    device = _device(model)
    step = 0
    with training_mode(model, True):
        for _ in range(epochs):
            for inputs, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(inputs), targets)
                loss.backward()
                opt.step()
                step += 1
                if callback is not None:
                    callback(step)
    return step


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` on ``loader``, in [0, 1], in eval mode and without gradients.

    The model's previous training mode is restored afterwards.
    """
    device = _device(model)
    correct = total = 0
    with eval_mode(model):
        with torch.no_grad():
            for inputs, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                correct += int((model(inputs).argmax(dim=1) == targets).sum())
                total += targets.numel()
    if total == 0:
        raise ValueError("evaluate() got an empty loader")
    return correct / total
