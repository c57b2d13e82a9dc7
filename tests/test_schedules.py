"""Schedules: the formulas of OneShot, Iterative (geometric) and AGP (Zhu & Gupta 2017)."""

import pytest

from prunekit import schedules
from prunekit.schedules import AGP, Iterative, OneShot, get_schedule


def test_one_shot():
    s = OneShot(0.8, at=5)
    assert [s.at(t) for t in (0, 4, 5, 100)] == [0.0, 0.0, 0.8, 0.8]
    assert [t for t in range(20) if s.is_prune_step(t)] == [5] == s.prune_steps()


def test_iterative_is_geometric():
    s = Iterative(final=0.9, steps=4, every=10, start=3)
    assert s.prune_steps() == [3, 13, 23, 33]
    assert [t for t in range(60) if s.is_prune_step(t)] == s.prune_steps()
    assert s.at(2) == 0.0
    for k, t in enumerate(s.prune_steps(), start=1):
        expected = 1 - (1 - 0.9) ** (k / 4)
        assert s.at(t) == pytest.approx(expected)
        assert s.at(t + 9) == pytest.approx(expected)  # holds between events
    assert s.at(1000) == pytest.approx(0.9)
    # each event removes the same fraction of what is left
    kept = [1 - s.at(t) for t in s.prune_steps()]
    assert kept[1] / kept[0] == pytest.approx(kept[3] / kept[2])


def test_agp_follows_zhu_gupta():
    s = AGP(initial=0.1, final=0.9, start=100, end=1100, every=100)
    assert s.at(0) == 0.0 and s.at(99) == 0.0
    for t in range(100, 1100, 100):
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 100) / 1000) ** 3
        assert s.at(t) == pytest.approx(expected)
        assert s.at(t + 57) == pytest.approx(expected)  # holds the last value between prune steps
    assert s.at(100) == pytest.approx(0.1)
    assert s.at(1100) == 0.9 and s.at(5000) == 0.9
    assert s.prune_steps() == list(range(100, 1101, 100))
    assert [t for t in range(2000) if s.is_prune_step(t)] == s.prune_steps()
    values = [s.at(t) for t in s.prune_steps()]
    increments = [b - a for a, b in zip(values, values[1:])]
    assert all(x > y for x, y in zip(increments, increments[1:]))  # fast first, then slower


def test_agp_when_end_is_not_on_the_grid():
    s = AGP(initial=0.0, final=0.5, start=0, end=250, every=100)
    assert s.prune_steps() == [0, 100, 200, 250]
    assert s.at(249) == pytest.approx(0.5 - 0.5 * (1 - 200 / 250) ** 3)
    assert s.at(250) == 0.5


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: OneShot(1.2), r"sparsity must be in \[0, 1\)"),
        (lambda: Iterative(0.9, steps=0, every=1), "steps must be an integer >= 1"),
        (lambda: Iterative(0.9, steps=2, every=0), "every must be an integer >= 1"),
        (lambda: AGP(0.0, 0.9, start=10, end=10, every=1), "end > start"),
        (lambda: AGP(0.5, 0.2, start=0, end=10, every=1), "final >= initial"),
        (lambda: get_schedule("agpp", final=0.9), "did you mean 'agp'"),
        (lambda: get_schedule("agp", finale=0.9), "schedule 'agp'"),
    ],
)
def test_bad_schedules(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_registry_builds_by_name():
    s = get_schedule("iterative", final=0.5, steps=2, every=3)
    assert isinstance(s, schedules.Iterative) and s.at(3) == pytest.approx(0.5)
