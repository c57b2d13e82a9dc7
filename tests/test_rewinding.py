"""Weight and learning-rate rewinding: exact values back, masks kept, schedules replayed."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.models import LeNet5, TinyMLP
from prunekit.training import (
    Checkpoint,
    capture,
    replay_schedule,
    rewind,
    rewind_learning_rate,
    rewind_weights,
)


def _steps(model, opt, n, sched=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 64, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_weight_rewinding_restores_exactly_the_saved_values_of_surviving_weights():
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _steps(model, opt, 3)
    early = capture(model, step=3)
    saved = {k: v.clone() for k, v in early.weights.items()}
    _steps(model, opt, 5, seed=1)
    pk.prune(model, 0.7)
    masks = pk.masks(model)
    rewind_weights(model, early)
    for name, mask in masks.items():
        value = model.get_submodule(name.rpartition(".")[0]).weight.detach()
        assert torch.equal(value[mask], saved[name][mask])  # bit for bit
        assert torch.equal(value[~mask], torch.zeros_like(value[~mask]))
    assert torch.equal(model.fc1.bias, saved["fc1.bias"])
    assert pk.masks(model)["fc1.weight"].equal(masks["fc1.weight"])  # masks are kept


def test_rewinding_restores_buffers_and_checks_everything_first():
    model = LeNet5()
    model.add_module("bn", nn.BatchNorm1d(4))
    model.bn.running_mean.fill_(1.0)
    ckpt = capture(model, step=0)
    model.bn.running_mean.fill_(5.0)
    rewind_weights(model, ckpt)
    assert torch.equal(model.bn.running_mean, torch.ones(4))

    other = TinyMLP(hidden=16)
    before = other.fc1.weight.detach().clone()
    with pytest.raises(ValueError, match="shape"):
        rewind_weights(other, capture(TinyMLP(hidden=32)))
    assert torch.equal(other.fc1.weight, before)  # nothing written
    with pytest.raises(ValueError, match="does not have"):
        rewind_weights(TinyMLP(), capture(LeNet5()))
    assert isinstance(ckpt, Checkpoint) and "step=0" in repr(ckpt)


def test_learning_rate_rewinding_keeps_weights_and_replays_the_schedule():
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _steps(model, opt, 2, sched)
    point = capture(model, step=2, optimizer=opt, scheduler=sched)
    lrs_after_point = []
    for _ in range(4):
        _steps(model, opt, 1, sched)
        lrs_after_point.append(opt.param_groups[0]["lr"])
    trained = model.fc1.weight.detach().clone()
    rewind(model, point, optimizer=opt, scheduler=sched, weights=False)
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(model.fc1.weight, trained)  # weights kept
    assert opt.state == {} or all(not s for s in opt.state.values())  # momentum cleared by default
    replayed = []
    for _ in range(4):
        _steps(model, opt, 1, sched)
        replayed.append(opt.param_groups[0]["lr"])
    assert replayed == lrs_after_point == [0.5, 0.25, 0.25, 0.125]


def test_weight_rewinding_also_rewinds_the_schedule():
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    point = capture(model, step=0, optimizer=opt, scheduler=sched)
    _steps(model, opt, 3, sched)
    rewind(model, point, optimizer=opt, scheduler=sched)
    assert opt.param_groups[0]["lr"] == 1.0
    assert torch.equal(model.fc2.weight, point.weights["fc2.weight"])


def test_replay_schedule_fast_forwards_a_fresh_scheduler():
    opt = torch.optim.SGD(TinyMLP().parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    replay_schedule(sched, 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="steps"):
        replay_schedule(sched, -1)


def test_rewind_refuses_what_the_checkpoint_does_not_hold():
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    bare = capture(model)
    with pytest.raises(ValueError, match="no optimizer state"):
        rewind_learning_rate(opt, None, bare)
    with pytest.raises(ValueError, match="nothing to rewind"):
        rewind(model, bare, weights=False, learning_rate=False)
    with pytest.raises(ValueError, match="optimizer_state"):
        rewind_learning_rate(opt, None, capture(model, optimizer=opt), optimizer_state="zero")
