"""Lottery tickets: the IMP procedure step by step, the random re-initialisation control, and the
paper's claim on digits (the rewound ticket beats random re-initialisation with the same mask)."""

import copy

import pytest
import torch

import prunekit as pk
from prunekit.data import digits, evaluate, loaders, train
from prunekit.models import LeNet5, LeNet300100, TinyMLP
from prunekit.training import LotteryTicket, reinitialize


def _fake_train(model, callback, steps=4):
    """Moves every weight a little, calling callback after each 'optimizer step'."""
    with torch.no_grad():
        for step in range(1, steps + 1):
            for p in model.parameters():
                p.add_(0.01)
            if callback is not None:
                callback(step)
    return step


def test_imp_prunes_a_fraction_of_the_remaining_weights_and_rewinds_to_init():
    model = TinyMLP()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ticket = LotteryTicket(model, rate=0.5, rewind_step=0)
    history = ticket.run(_fake_train, rounds=3)
    assert [round(h.sparsity, 4) for h in history] == [0.0, 0.5, 0.75, 0.875]
    # the model ends trained at the final sparsity: after the last rewind it trained once more
    pruned_once = copy.deepcopy(model)
    masks = pk.masks(model)
    ticket.rewind()
    for name, mask in masks.items():
        weight = model.get_submodule(name.rpartition(".")[0]).weight.detach()
        assert torch.equal(weight[mask], init[name][mask])
    assert not torch.equal(pruned_once.fc1.weight, model.fc1.weight)


def test_late_resetting_rewinds_to_the_weights_after_k_steps():
    model = TinyMLP()
    start = model.fc1.weight.detach().clone()
    ticket = LotteryTicket(model, rate=0.2, rewind_step=2)
    ticket.run(_fake_train, rounds=1)
    assert ticket.checkpoint.step == 2
    ticket.rewind()
    mask = pk.masks(model)["fc1.weight"]
    torch.testing.assert_close(model.fc1.weight.detach()[mask], (start + 0.02)[mask])

    never = LotteryTicket(TinyMLP(), rate=0.2, rewind_step=10)
    with pytest.raises(RuntimeError, match="no weights saved at step 10"):
        never.run(_fake_train, rounds=1)


def test_lottery_ticket_refuses_bad_arguments_before_anything():
    model = TinyMLP()
    for kwargs, message in [
        (dict(rate=1.0), "rate"),
        (dict(rate=0.2, rewind_step=-1), "rewind_step"),
        (dict(rate=0.2, method="magnitud"), "did you mean 'magnitude'"),
        (dict(rate=0.2, exclude=["nope"]), "matches none"),
    ]:
        with pytest.raises(ValueError, match=message):
            LotteryTicket(model, **kwargs)
    with pytest.raises(ValueError, match="rounds"):
        LotteryTicket(model).run(_fake_train, rounds=0)
    assert pk.masks(model) == {}


def test_reinitialize_keeps_the_mask_and_draws_from_the_model_init():
    torch.manual_seed(0)
    model = LeNet5()
    pk.prune(model, 0.8)
    masks = {k: v.clone() for k, v in pk.masks(model).items()}
    control = copy.deepcopy(model)
    reinitialize(control, seed=7, factory=LeNet5)
    torch.manual_seed(7)
    fresh = LeNet5()  # the factory path gives exactly a new instance's values on the kept entries
    for name, mask in masks.items():
        value = control.get_submodule(name.rpartition(".")[0]).weight.detach()
        assert torch.equal(value[mask], fresh.state_dict()[name][mask])
        assert torch.equal(value[~mask], torch.zeros_like(value[~mask]))
    assert all(pk.masks(control)[k].equal(v) for k, v in masks.items())

    state = torch.random.get_rng_state()
    again = copy.deepcopy(model)
    reinitialize(again, seed=3)  # reset_parameters path, seeded, global RNG untouched
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(again.fc1.weight, model.fc1.weight)
    bound = 1 / 64**0.5  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(again.fc1.weight.detach().abs().max()) <= bound
    assert pk.masks(again)["fc1.weight"].equal(masks["fc1.weight"])
    third = copy.deepcopy(model)
    reinitialize(third, seed=3)
    assert torch.equal(third.fc1.weight, again.fc1.weight)


@pytest.mark.slow
def test_rewound_ticket_beats_random_reinitialisation_at_over_90_percent_sparsity():
    torch.manual_seed(0)
    train_set, test_set = digits()
    train_loader, test_loader = loaders(train_set, test_set, batch_size=64, seed=0)
    model = LeNet300100()

    def fit(m, callback):
        torch.manual_seed(1)
        train(m, train_loader, epochs=10, lr=1e-3, callback=callback)
        return evaluate(m, test_loader)

    ticket = LotteryTicket(model, rate=0.5, rewind_step=0)
    history = ticket.run(fit, rounds=4)
    assert ticket.sparsity == pytest.approx(0.9375, abs=1e-3)
    control = ticket.control(seed=123, factory=LeNet300100)
    assert pk.sparsity(control) == pytest.approx(0.9375, abs=1e-3)
    control_accuracy = fit(control, None)
    ticket_accuracy = history[-1].result
    assert ticket_accuracy > control_accuracy + 0.03, (ticket_accuracy, control_accuracy)
    assert ticket_accuracy > history[0].result - 0.05  # the ticket is nearly as good as the dense net
