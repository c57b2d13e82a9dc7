"""What a criterion is: a rule that turns a parameter (and optional statistics) into scores.

Higher score = more important = kept longer. Scores have the parameter's shape; the granularity reduces
them to group scores and the scope decides how many groups go.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ..registry import Registry
from ..statistics import TargetStatistics
from ..targets import Target

__all__ = ["Criterion", "CRITERIA", "get_criterion"]


class Criterion:
    """Base class. Subclasses set ``name`` and ``needs`` and implement ``score``."""

    name: ClassVar[str] = ""
    #: statistics this criterion reads: any of "grad_abs", "grad_sq", "movement"; empty = data-free
    needs: ClassVar[frozenset[str]] = frozenset()
    #: scores may be negative (group reduction then sums instead of taking a norm)
    signed: ClassVar[bool] = False
    #: ``prune`` reaches the sparsity in this many rounds, re-scoring before each, the kept fraction
    #: shrinking geometrically (SynFlow: 100); 1 = one-shot
    rounds: int = 1
    #: batches of ``data`` used when the caller gives no ``max_batches`` (None = all; SNIP: one)
    default_batches: ClassVar[int | None] = None

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)

    def prepare(self, model, targets: list[Target], stats: dict[str, TargetStatistics] | None, data=None) -> None:
        """Called once before the targets are scored, with everything at hand: criteria that need the
        whole model at once (SynFlow's forward pass, SNIP's normalisation) compute it here."""

    def update_weights(self, model, targets: list[Target], masks) -> None:
        """Called with the new keep-masks ``{target name: mask}`` just before they are attached, under
        ``no_grad``: methods that compensate for what they remove (OBS) move the kept weights here."""

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        """Scores of ``target``'s entries: a float tensor of the parameter's shape."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


CRITERIA: Registry[type[Criterion]] = Registry("method")


def get_criterion(method: str | Criterion) -> Criterion:
    """A criterion instance from its registered name (or the instance itself)."""
    if isinstance(method, Criterion):
        return method
    return CRITERIA.get(method)()


def require(stats: TargetStatistics | None, what: str, criterion: str, target: Target) -> Tensor:
    value = None if stats is None else getattr(stats, what)
    if value is None:
        raise ValueError(f"{criterion} needs gradient statistics for {target.name}; pass data= (and loss_fn=)")
    return value
