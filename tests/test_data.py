"""Built-in data and the training helpers."""


import numpy as np
import pytest
import torch
from torch import nn

from prunekit import data
from prunekit.models import TinyMLP, resnet8, vgg_small

torch.set_num_threads(1)


# -------------------------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range():
    train, test = data.digits()
    x, y = train.tensors
    assert len(train) + len(test) == 1797
    assert len(test) == 360  # ceil(0.2 * 1797)
    assert x.shape == (1437, 64) and x.dtype == torch.float32
    assert y.shape == (1437,) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    assert set(y.tolist()) == set(range(10))


def test_digits_image_layout_matches_flat():
    flat, _ = data.digits()
    image, _ = data.digits(image=True)
    assert image.tensors[0].shape == (1437, 1, 8, 8)
    assert torch.equal(image.tensors[0].reshape(-1, 64), flat.tensors[0])
    assert torch.equal(image.tensors[1], flat.tensors[1])


def test_digits_split_is_stratified():
    train, test = data.digits(test_fraction=0.2)
    all_labels = torch.cat([train.tensors[1], test.tensors[1]])
    overall = torch.bincount(all_labels, minlength=10).double() / len(all_labels)
    for split in (train, test):
        freq = torch.bincount(split.tensors[1], minlength=10).double() / len(split)
        assert torch.allclose(freq, overall, atol=0.01)


def test_digits_split_deterministic_and_seed_dependent():
    a_train, a_test = data.digits(split_seed=0)
    b_train, b_test = data.digits(split_seed=0)
    for a, b in zip(a_train.tensors + a_test.tensors, b_train.tensors + b_test.tensors):
        assert torch.equal(a, b)
    c_train, _ = data.digits(split_seed=1)
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])


def test_digits_split_is_disjoint_and_complete():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = sorted(map(tuple, np.column_stack([bunch.data / 16.0, bunch.target]).tolist()))

    def rows(split):
        x, y = split.tensors
        return [tuple(r) for r in torch.column_stack([x.double(), y.double()]).tolist()]

    train, test = data.digits()
    assert len(set(full)) == len(full)  # the digits have no duplicated (image, label) rows
    # train + test is exactly the dataset, and no sample is in both splits
    assert sorted(rows(train) + rows(test)) == full
    assert not set(rows(train)) & set(rows(test))


def test_digits_returns_fresh_tensors():
    train, _ = data.digits()
    train.tensors[0].zero_()
    again, _ = data.digits()
    assert again.tensors[0].max() == 1


def test_digits_is_cached(monkeypatch):
    import sklearn.datasets
    import sklearn.model_selection

    calls = {"load": 0, "split": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(sklearn.datasets, "load_digits", counted("load", sklearn.datasets.load_digits))
    monkeypatch.setattr(sklearn.model_selection, "train_test_split",
                        counted("split", sklearn.model_selection.train_test_split))
    data._digits_arrays.cache_clear()
    data._digits_split.cache_clear()
    try:
        first = data.digits()
        for _ in range(5):
            again = data.digits()
        assert calls == {"load": 1, "split": 1}  # read and split once, however often it is asked for
        data.digits(split_seed=1)
        assert calls == {"load": 1, "split": 2}  # another split of the same arrays
        assert all(torch.equal(a, b) for a, b in zip(first[0].tensors + first[1].tensors,
                                                      again[0].tensors + again[1].tensors))
    finally:
        data._digits_arrays.cache_clear()
        data._digits_split.cache_clear()


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    import sys

    data._digits_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match=r'pip install "prunekit\[demo\]"'):
            data.digits()
    finally:
        data._digits_arrays.cache_clear()


# ------------------------------------------------------------------------------------------- loaders


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loaders_are_deterministic_with_a_seed():
    train, test = data.digits()
    a = _batches(data.loaders(train, test, batch_size=32, seed=7)[0])
    b = _batches(data.loaders(train, test, batch_size=32, seed=7)[0])
    c = _batches(data.loaders(train, test, batch_size=32, seed=8)[0])
    assert len(a) == len(b) == (1437 + 31) // 32
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    # shuffled: the first batch is not the first rows of the dataset
    assert not torch.equal(a[0][1], train.tensors[1][:32])


def test_test_loader_keeps_order():
    train, test = data.digits()
    _, test_loader = data.loaders(train, test, batch_size=50)
    labels = torch.cat([y for _, y in test_loader])
    assert torch.equal(labels, test.tensors[1])


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_classification_shapes_and_determinism():
    train, test = data.synthetic_classification(n=400, features=12, classes=4, informative=5, seed=3)
    assert len(train) + len(test) == 400 and len(test) == 100
    assert train.tensors[0].shape == (300, 12) and train.tensors[0].dtype == torch.float32
    assert train.tensors[1].dtype == torch.int64
    assert torch.bincount(test.tensors[1], minlength=4).tolist() == [25, 25, 25, 25]
    again, _ = data.synthetic_classification(n=400, features=12, classes=4, informative=5, seed=3)
    other, _ = data.synthetic_classification(n=400, features=12, classes=4, informative=5, seed=4)
    assert torch.equal(train.tensors[0], again.tensors[0])
    assert not torch.equal(train.tensors[0], other.tensors[0])
    with pytest.raises(ValueError):
        data.synthetic_classification(features=4, informative=5)


def test_synthetic_classification_noise_features_carry_no_signal():
    train, _ = data.synthetic_classification(n=4000, features=10, classes=4, informative=3, seed=0)
    x, y = train.tensors
    means = torch.stack([x[y == c].mean(0) for c in range(4)])  # (classes, features)
    spread = means.std(0)
    assert spread[:3].min() > 0.3  # informative features separate the classes
    assert spread[3:].max() < 0.1  # the rest is noise


def test_synthetic_classification_is_learnable():
    torch.manual_seed(0)
    train, test = data.synthetic_classification(n=1024, features=20, classes=4, seed=0)
    train_loader, test_loader = data.loaders(train, test, batch_size=64)
    model = TinyMLP(20, hidden=32, num_classes=4)
    data.train(model, train_loader, epochs=5, lr=1e-2)
    assert data.evaluate(model, test_loader) > 0.9


def test_synthetic_images_shapes_and_determinism():
    train, test = data.synthetic_images(n=64, channels=3, size=32, classes=4, seed=1)
    assert len(train) == 48 and len(test) == 16
    assert train.tensors[0].shape == (48, 3, 32, 32) and train.tensors[0].dtype == torch.float32
    assert torch.bincount(train.tensors[1], minlength=4).tolist() == [12, 12, 12, 12]
    again, _ = data.synthetic_images(n=64, channels=3, size=32, classes=4, seed=1)
    assert torch.equal(train.tensors[0], again.tensors[0])
    one, _ = data.synthetic_images(n=40, channels=1, size=8, classes=2)
    assert one.tensors[0].shape == (30, 1, 8, 8)


def test_synthetic_images_mean_colour_carries_no_label():
    # only the orientation is informative: per-class mean intensities are all close
    train, _ = data.synthetic_images(n=2000, size=16, seed=0)
    x, y = train.tensors
    per_class = torch.stack([x[y == c].mean() for c in range(4)])
    assert per_class.abs().max() < 0.05


# -------------------------------------------------------------------------------- train / evaluate


def test_train_calls_callback_after_every_step_and_counts_steps():
    train, test = data.synthetic_classification(n=200, features=8, seed=0)
    loader, _ = data.loaders(train, test, batch_size=50)  # 150 train samples -> 3 batches
    torch.manual_seed(0)
    model = TinyMLP(8, num_classes=4)
    seen = []
    before = model.fc1.weight.detach().clone()
    steps = data.train(model, loader, epochs=2, optimizer="sgd", callback=seen.append)
    assert steps == 6 and seen == [1, 2, 3, 4, 5, 6]
    assert not torch.equal(before, model.fc1.weight)


def test_train_accepts_an_optimizer_and_rejects_unknown_names():
    train, test = data.synthetic_classification(n=200, features=8, seed=0)
    loader, _ = data.loaders(train, test, batch_size=50)
    model = TinyMLP(8, num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert data.train(model, loader, optimizer=opt) == 3
    with pytest.raises(ValueError, match="adam"):
        data.train(model, loader, optimizer="lbfgs")


def test_train_is_deterministic_given_seeds():
    train, test = data.synthetic_classification(n=256, features=8, seed=0)

    def run():
        torch.manual_seed(0)
        model = TinyMLP(8, num_classes=4)
        loader, _ = data.loaders(train, test, batch_size=32, seed=5)
        data.train(model, loader, epochs=2)
        return model.fc2.weight.detach()

    assert torch.equal(run(), run())


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_training_mode(training):
    train, test = data.synthetic_images(n=32, size=8, seed=0)
    _, loader = data.loaders(train, test, batch_size=8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(4))
    model(train.tensors[0][:2])  # materialise the lazy layer
    model.train(training)
    stats = model[1].running_mean.clone()
    acc = data.evaluate(model, loader)
    assert 0.0 <= acc <= 1.0
    assert model.training is training and all(m.training is training for m in model.modules())
    assert torch.equal(stats, model[1].running_mean)  # eval mode: batch norm statistics untouched


def test_evaluate_counts_correct_predictions():
    x = torch.eye(4)
    y = torch.tensor([0, 1, 2, 0])
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    assert data.evaluate(model, loader) == pytest.approx(0.75)


def test_train_restores_training_mode():
    train, test = data.synthetic_classification(n=64, features=4, seed=0)
    loader, _ = data.loaders(train, test, batch_size=16)
    model = TinyMLP(4, num_classes=4).eval()
    data.train(model, loader)
    assert not model.training


# --------------------------------------------------------------------------------- learning checks


def test_lenet300100_learns_digits(lenet_digits, digits_loaders):
    # the session's LeNet-300-100 (tests/conftest.py): 15 epochs of 23 batches of 64 (1437 training images)
    assert lenet_digits.steps == 15 * 23
    assert lenet_digits.accuracy == data.evaluate(lenet_digits.model, digits_loaders[1]) > 0.93


@pytest.mark.parametrize("factory", [resnet8, vgg_small], ids=["resnet8", "vgg_small"])
def test_small_convnets_learn_synthetic_images(factory):
    torch.manual_seed(0)
    train, test = data.synthetic_images(n=512, channels=3, size=16, classes=4, seed=0)
    train_loader, test_loader = data.loaders(train, test, batch_size=32, seed=0)
    model = factory(in_channels=3, num_classes=4)
    data.train(model, train_loader, epochs=3, lr=1e-3)
    assert data.evaluate(model, test_loader) > 0.8  # chance is 0.25


def test_reachable_as_an_attribute_of_the_package():
    import prunekit as pk

    assert pk.data is data  # the README's lottery-ticket example calls pk.data.train
