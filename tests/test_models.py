"""Reference models: shapes on 8x8 and 32x32 inputs, parameter counts, registry, determinism."""

import pytest
import torch
from torch import nn

from prunekit import models
from prunekit.models import (
    MODELS,
    VGG,
    LeNet5,
    LeNet300100,
    ResNet,
    TinyMLP,
    get_model,
    resnet8,
    resnet20,
    vgg11,
    vgg_small,
)

torch.set_num_threads(1)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# name -> (kwargs for 1x8x8 digits, kwargs for 3x32x32 images)
GEOMETRY = {
    "lenet300100": ({"in_features": 64}, {"in_features": 3 * 32 * 32}),
    "tiny_mlp": ({"in_features": 64}, {"in_features": 3 * 32 * 32}),
    "lenet5": ({"in_channels": 1, "image_size": 8}, {"in_channels": 3, "image_size": 32}),
    "vgg_small": ({"in_channels": 1}, {"in_channels": 3}),
    "vgg11": ({"in_channels": 1}, {"in_channels": 3}),
    "resnet8": ({"in_channels": 1}, {"in_channels": 3}),
    "resnet20": ({"in_channels": 1}, {"in_channels": 3}),
}


def test_registry_covers_every_model():
    assert set(MODELS) == set(GEOMETRY)


@pytest.mark.parametrize("name", sorted(GEOMETRY))
@pytest.mark.parametrize("geometry", ["digits", "cifar"])
def test_forward_shape(name, geometry):
    small, large = GEOMETRY[name]
    kwargs, shape = (small, (5, 1, 8, 8)) if geometry == "digits" else (large, (2, 3, 32, 32))
    torch.manual_seed(0)
    model = get_model(name, num_classes=7, **kwargs)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], 7)
    assert torch.isfinite(out).all()


def test_mlps_accept_flat_inputs():
    assert LeNet300100()(torch.randn(4, 64)).shape == (4, 10)
    assert TinyMLP(64, hidden=8, num_classes=3)(torch.randn(4, 64)).shape == (4, 3)


def test_lenet300100_parameter_count_and_names():
    model = LeNet300100(in_features=64, num_classes=10)
    expected = (64 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)
    assert n_params(model) == expected == 50_610
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["fc1", "fc2", "fc3"]


def test_lenet5_parameter_count_8x8():
    # padding 2: 8x8 -> conv 8x8 -> pool 4x4 -> conv 4x4 -> pool 2x2, so fc1 sees 16 * 2 * 2
    model = LeNet5(in_channels=1, num_classes=10, image_size=8)
    expected = (
        (1 * 6 * 5 * 5 + 6)
        + (6 * 16 * 5 * 5 + 16)
        + (16 * 2 * 2 * 120 + 120)
        + (120 * 84 + 84)
        + (84 * 10 + 10)
    )
    assert n_params(model) == expected
    assert model.fc1.in_features == 64
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert names == ["conv1", "conv2", "fc1", "fc2", "fc3"]


def test_lenet5_classic_geometry_32x32():
    # no padding: 32 -> 28 -> 14 -> 10 -> 5, so fc1 sees 16 * 5 * 5 (classic LeNet-5: 61,706 params)
    model = LeNet5(in_channels=1, num_classes=10, image_size=32)
    assert model.conv1.padding == (0, 0)
    assert model.fc1.in_features == 400
    expected = (1 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert n_params(model) == expected == 61_706


def test_lenet5_rejects_too_small_images():
    with pytest.raises(ValueError, match="too small"):
        LeNet5(image_size=4, padding=0)


def test_vgg_structure():
    model = vgg_small(in_channels=3, num_classes=10)
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 256
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128, 256]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == len(convs)
    assert len([m for m in vgg11().features if isinstance(m, nn.Conv2d)]) == 8


def test_vgg_without_batch_norm_has_conv_biases():
    model = VGG(cfg=(8, "M", 16), in_channels=1, num_classes=3, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.features if isinstance(m, nn.Conv2d))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError):
        VGG(cfg=("M",))


def test_resnet_depth_and_shortcuts():
    r8, r20 = resnet8(), resnet20()
    assert [len(r8.layer1), len(r8.layer2), len(r8.layer3)] == [1, 1, 1]
    assert [len(r20.layer1), len(r20.layer2), len(r20.layer3)] == [3, 3, 3]
    # 6n + 2 weight layers: stem + 2 per block + fc (projection shortcuts not counted)
    main_convs = [n for n, m in r20.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    assert len(main_convs) + 1 == 20
    # projection only where the shape changes: first block of stages 2 and 3
    assert r20.layer1[0].downsample is None
    assert isinstance(r20.layer2[0].downsample[0], nn.Conv2d)
    assert r20.layer2[0].downsample[0].kernel_size == (1, 1)
    assert isinstance(r20.layer2[0].downsample[1], nn.BatchNorm2d)
    assert r20.layer2[1].downsample is None and r20.layer3[0].downsample is not None
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet(depth=10)


def test_resnet_custom_widths():
    model = resnet8(in_channels=1, num_classes=4, widths=(4, 8, 12))
    assert model.conv1.out_channels == 4 and model.fc.in_features == 12
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 4)


def test_conv_init_is_kaiming_and_deterministic():
    torch.manual_seed(123)
    a = resnet20()
    torch.manual_seed(123)
    b = resnet20()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    # kaiming_normal_(fan_out, relu): std = sqrt(2 / (out_channels * k * k))
    w = a.layer3[1].conv1.weight
    expected = (2.0 / (64 * 9)) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.05
    assert torch.all(a.bn1.weight == 1) and torch.all(a.bn1.bias == 0)


def test_get_model_is_forgiving_about_case_and_separators():
    assert isinstance(get_model("LeNet-300-100"), LeNet300100)
    assert isinstance(get_model("vgg-small", num_classes=3), VGG)


def test_get_model_unknown_name_suggests_closest():
    with pytest.raises(ValueError) as info:
        get_model("resnet2O")
    message = str(info.value)
    assert "'resnet2O'" in message
    assert "did you mean 'resnet20'?" in message
    for name in MODELS:
        assert name in message


def test_get_model_unknown_name_without_close_match_lists_known():
    with pytest.raises(ValueError, match=r"unknown model 'transformer' \(known: lenet300100, lenet5") as info:
        get_model("transformer")
    assert "did you mean" not in str(info.value)


def test_public_names():
    for name in models.__all__:
        assert hasattr(models, name)
