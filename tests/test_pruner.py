"""Pruner: schedules inside a training loop, gradient criteria from the loop, checkpoints."""

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.schedules import AGP, Iterative, OneShot


def mlp():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))


def loop(model, pruner, steps, lr=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    reports = []
    for _ in range(steps):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 4, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reports.append(pruner.step())
    return reports


def test_agp_inside_a_training_loop_tracks_the_schedule():
    model = mlp()
    schedule = AGP(initial=0.0, final=0.8, start=2, end=12, every=2)
    pruner = pk.Pruner(model, schedule, max_layer_sparsity=0.95)
    reports = loop(model, pruner, 16)
    pruned_at = [t for t, r in enumerate(reports) if r is not None]
    assert pruned_at == [4, 6, 8, 10, 12]  # step 2 has target 0: nothing to do
    for t in pruned_at:
        assert reports[t].sparsity == pytest.approx(schedule.at(t), abs=2e-3)
    assert pk.sparsity(model) == pytest.approx(0.8, abs=2e-3)
    # pruned weights stayed zero through the SGD steps in between
    for name, mask in pk.masks(model).items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert (module.weight[~mask] == 0).all()


def test_iterative_masks_are_nested():
    model = mlp()
    pruner = pk.Pruner(model, Iterative(final=0.9, steps=3, every=5), max_layer_sparsity=0.97)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    previous = None
    for _ in range(15):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 4, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if pruner.step() is not None:
            current = {n: m.clone() for n, m in pk.masks(model).items()}
            if previous:
                assert all(not (current[n] & ~previous[n]).any() for n in current)
            previous = current
    assert len(pruner.history) == 3
    assert pk.sparsity(model) == pytest.approx(0.9, abs=1e-3)


def test_taylor_from_the_training_loop_gradients():
    model = mlp()
    pruner = pk.Pruner(model, OneShot(0.5, at=3), method="taylor", scope="local")
    grads = []
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights fixed, so the score is checkable
    for _ in range(4):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        grads.append(model[0].weight.grad.abs())
        pruner.step()
    expected = model[0].weight.detach().abs() * torch.stack(grads).mean(0)  # mean over steps of |w g|
    mask = pk.masks(model)["0.weight"]
    assert int((~mask).sum()) == 160
    assert expected[~mask].max() <= expected[mask].min()


def test_gradient_method_without_gradients_says_what_to_do():
    model = mlp()
    pruner = pk.Pruner(model, OneShot(0.5), method="taylor")
    with pytest.raises(RuntimeError, match="call pruner.step\\(\\) after optimizer.step\\(\\)"):
        pruner.step()


def test_movement_accumulates_and_checkpoints():
    model = mlp()
    pruner = pk.Pruner(model, OneShot(0.5, at=6), method="movement")
    loop(model, pruner, 4)
    state = pruner.state_dict()
    assert state["step_count"] == 4 and set(state["movement"]) == {"0.weight", "2.weight"}
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    resumed = pk.Pruner(twin, OneShot(0.5, at=6), method="movement")
    resumed.load_state_dict(state)
    loop(model, pruner, 3, seed=5)
    loop(twin, resumed, 3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(pk.masks(model).values(), pk.masks(twin).values()))


def test_pruner_validates_up_front():
    model = mlp()
    with pytest.raises(TypeError, match="schedule must be a prunekit schedule"):
        pk.Pruner(model, 0.5)
    with pytest.raises(ValueError, match="unknown method"):
        pk.Pruner(model, OneShot(0.5), method="nope")
    with pytest.raises(ValueError, match="fixes sparsity at 0.5"):
        pk.Pruner(nn.Sequential(nn.Linear(8, 8)), OneShot(0.7), granularity="2:4")
    assert pk.masks(model) == {}


def test_n_m_pruner_applies_the_pattern():
    model = nn.Sequential(nn.Linear(8, 8))
    pruner = pk.Pruner(model, OneShot(0.5, at=1), granularity="2:4")
    assert pruner.step() is None
    report = pruner.step()
    assert report.sparsity == 0.5
    assert (pk.masks(model)["0.weight"].reshape(8, 2, 4).sum(-1) == 2).all()


def test_one_request_description_and_the_pruner_contract():
    import dataclasses
    import inspect

    from prunekit.pruning import PruningOptions, PruningPlan, PruningSpec

    fields = [f.name for f in dataclasses.fields(PruningOptions)]
    assert list(inspect.signature(pk.prune).parameters) == ["model", "sparsity", *fields]
    assert list(inspect.signature(pk.Pruner).parameters) == ["model", "schedule", *fields, "structured"]
    model = mlp()
    masked = PruningSpec(model, PruningOptions(method="random", scope="local"))
    structured = pk.structured.StructuredSpec(model, torch.randn(2, 10), method="l1")
    for plan in (masked, structured):
        assert isinstance(plan, PruningPlan)
    assert masked.gradient_targets == masked.targets and structured.gradient_targets == ()
    assert PruningSpec(model, "taylor").gradient_needs == frozenset({"grad_sq"})
    assert structured.gradient_needs == frozenset() and structured.fixed_sparsity is None
    assert PruningSpec(nn.Sequential(nn.Linear(8, 8)), granularity="2:4").fixed_sparsity == 0.5
    with pytest.raises(TypeError, match=r"Pruner\(\) got an unexpected keyword argument 'sparsty'; did you mean "
                                        r"'max_layer_sparsity'\? \(it takes: method, granularity"):
        pk.Pruner(model, OneShot(0.5), sparsty=0.5)
    with pytest.raises(TypeError, match=r"prune\(\) got an unexpected keyword argument 'metod'; did you mean 'method'"):
        pk.prune(model, 0.5, metod="random")
    with pytest.raises(ValueError, match="method would not be used"):
        pk.Pruner(model, OneShot(0.5), structured=structured, method="taylor")
    assert pk.masks(model) == {}
