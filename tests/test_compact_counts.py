"""``StructuredSpec.compact()`` reports the parameters stored before and after the physical removal."""

import torch
from torch import nn

import prunekit as pk


def stored(model):
    return sum(p.numel() for p in model.parameters())


def test_compact_reports_real_parameter_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    dense = stored(model)  # 10*32+32 + 32*32+32 + 32*3+3 = 1507
    spec = pk.structured.StructuredSpec(model, torch.randn(2, 10), method="l1")
    pruner = pk.Pruner(model, pk.schedules.OneShot(0.5), structured=spec)
    pruner.step()
    report = spec.compact()
    assert report.params_before == dense == 1507
    assert report.params_after == stored(model) == 10 * 16 + 16 + 16 * 16 + 16 + 16 * 3 + 3
