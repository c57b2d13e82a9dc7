"""When pruning happens: each schedule maps a training step to a target sparsity.

A schedule answers ``.at(step)`` with the target sparsity and ``.is_prune_step(step)`` with whether the
masks are updated at that step. ``Pruner`` (pruner.py) calls them from inside a training loop.
"""

from __future__ import annotations

from .registry import Registry
from .scope import check_sparsity

__all__ = ["Schedule", "OneShot", "Iterative", "AGP", "SCHEDULES", "get_schedule"]


def _check_step(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


class Schedule:
    """Base class: the target sparsity at each step."""

    final: float

    def at(self, step: int) -> float:
        """Target sparsity at ``step`` (0 before pruning starts)."""
        raise NotImplementedError

    def is_prune_step(self, step: int) -> bool:
        """Whether masks are re-scored and updated at ``step``."""
        raise NotImplementedError

    def prune_steps(self) -> list[int]:
        """Every step at which the schedule prunes."""
        raise NotImplementedError

    @property
    def last_step(self) -> int:
        return self.prune_steps()[-1]


SCHEDULES: Registry[type[Schedule]] = Registry("schedule")


@SCHEDULES.register("oneshot", "OneShot(sparsity, at=0): everything at one step")
class OneShot(Schedule):
    """Everything at once, at step ``at``."""

    def __init__(self, sparsity: float, at: int = 0) -> None:
        self.final = check_sparsity(sparsity)
        self.step = _check_step(at, "at")

    def at(self, step: int) -> float:
        return self.final if step >= self.step else 0.0

    def is_prune_step(self, step: int) -> bool:
        return step == self.step

    def prune_steps(self) -> list[int]:
        return [self.step]

    def __repr__(self) -> str:
        return f"OneShot(sparsity={self.final}, at={self.step})"


@SCHEDULES.register("iterative", "Iterative(final, steps, every, start=0): 1 - (1 - final)^(k/steps) after k events")
class Iterative(Schedule):
    """``steps`` prune events, ``every`` steps apart from ``start``; after the k-th of n the sparsity is
    ``1 - (1 - final) ** (k / n)``: each event removes the same fraction of what remains (Han et al. 2015,
    Frankle & Carbin 2019)."""

    def __init__(self, final: float, steps: int, every: int, start: int = 0) -> None:
        self.final = check_sparsity(final, "final")
        self.steps = _check_step(steps, "steps", 1)
        self.every = _check_step(every, "every", 1)
        self.start = _check_step(start, "start")

    def events_done(self, step: int) -> int:
        if step < self.start:
            return 0
        return min(self.steps, (step - self.start) // self.every + 1)

    def at(self, step: int) -> float:
        k = self.events_done(step)
        return 1.0 - (1.0 - self.final) ** (k / self.steps) if k else 0.0

    def is_prune_step(self, step: int) -> bool:
        offset = step - self.start
        return offset >= 0 and offset % self.every == 0 and offset // self.every < self.steps

    def prune_steps(self) -> list[int]:
        return [self.start + k * self.every for k in range(self.steps)]

    def __repr__(self) -> str:
        return f"Iterative(final={self.final}, steps={self.steps}, every={self.every}, start={self.start})"


@SCHEDULES.register("agp", "AGP(initial, final, start, end, every): cubic ramp of Zhu & Gupta 2017")
class AGP(Schedule):
    """Automated gradual pruning (Zhu & Gupta 2017): at prune step t = start + k * every,
    s_t = final + (initial - final) * (1 - (t - start) / (end - start)) ** 3; the value holds between
    prune steps, is 0 before ``start`` and ``final`` from ``end`` on."""

    def __init__(self, initial: float = 0.0, final: float = 0.9, start: int = 0, end: int = 1000, every: int = 100) -> None:
        self.initial = check_sparsity(initial, "initial")
        self.final = check_sparsity(final, "final")
        self.start = _check_step(start, "start")
        self.end = _check_step(end, "end")
        self.every = _check_step(every, "every", 1)
        if self.end <= self.start:
            raise ValueError(f"AGP needs end > start, got start={start}, end={end}")
        if self.final < self.initial:
            raise ValueError(f"AGP needs final >= initial, got initial={initial}, final={final}")

    def at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        if step >= self.end:
            return self.final
        t = self.start + (step - self.start) // self.every * self.every
        progress = (t - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def is_prune_step(self, step: int) -> bool:
        return step == self.end or (self.start <= step < self.end and (step - self.start) % self.every == 0)

    def prune_steps(self) -> list[int]:
        steps = list(range(self.start, self.end, self.every))
        return steps + [self.end] if steps[-1] != self.end else steps

    def __repr__(self) -> str:
        return (
            f"AGP(initial={self.initial}, final={self.final}, start={self.start}, "
            f"end={self.end}, every={self.every})"
        )


def get_schedule(name: str | Schedule, **kwargs) -> Schedule:
    """A schedule from its name and arguments (``get_schedule("agp", final=0.9, end=1000)``)."""
    if isinstance(name, Schedule):
        return name
    cls = SCHEDULES.get(name)
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise TypeError(f"schedule {name!r}: {error}") from None
