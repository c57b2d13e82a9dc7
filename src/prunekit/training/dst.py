"""Dynamic sparse training at constant sparsity: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

The network is sparse from the first step. Every ``update_every`` optimizer steps, until step ``end``,
each layer drops some of its active weights and regrows as many inactive ones:

* ``SET`` (Mocanu et al.): drops the fraction ``zeta`` of the smallest *positive* weights and ``zeta`` of
  the largest *negative* weights (those closest to zero on each side), ``zeta`` constant (0.3 in the
  paper; updates once per epoch there: ``update_every`` = steps per epoch); regrows at random.
* ``RigL`` (Evci et al.): drops the fraction ``f(t)`` of active weights with the smallest ``|w|``, the
  fraction decaying on a cosine, ``f(t) = alpha / 2 * (1 + cos(pi * t / end))``; regrows where the dense
  gradient is largest.
* ``SETCosine``: RigL's drop rule and schedule with SET's random growth (what RigL's paper compares
  against as "SET"; not Mocanu et al.'s rule).

Regrown weights start at zero (a
weight dropped and regrown in the same update keeps its value: it never left), and their optimizer state
(momentum, Adam moments) is cleared when the optimizer is given. Per-layer sparsities stay as allocated
at the start: uniform, or Erdős–Rényi-Kernel (ERK).

    dst = RigL(model, sparsity=0.9, end=int(0.75 * total_steps), update_every=100, optimizer=opt)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        dst.step()

RigL needs the gradient of the loss with respect to the *masked* weights too, which the masked parameter
never receives. Just before each update step, a probe (an identity parametrization after the mask)
records the gradient of the effective weight during that step's backward pass; it is removed after the
update, so the model carries nothing extra between updates. Under DDP the dense gradients are averaged
over ranks and the new masks are decided on rank 0 and broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import distributed, masking
from ..pruning import prune
from ..scope import check_sparsity, erk_sparsities
from ..targets import Target, resolve_targets

__all__ = ["DynamicSparseTraining", "SET", "SETCosine", "RigL", "cosine_update_fraction", "DISTRIBUTIONS"]

DISTRIBUTIONS = ("erk", "uniform")


def cosine_update_fraction(step: int, alpha: float, end: int) -> float:
    """``alpha / 2 * (1 + cos(pi * step / end))`` before ``end``, 0 from ``end`` on (Evci et al. 2020)."""
    if step >= end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end))


@dataclass
class Update:
    """What one mask update did: the step, the fraction updated, and how many weights moved per layer."""

    step: int
    fraction: float
    changed: dict[str, int]


class _DenseGradProbe(nn.Module):
    """Identity parametrization after the mask that records the gradient of the effective weight."""

    def __init__(self) -> None:
        super().__init__()
        self.grad: Tensor | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if weight.requires_grad and torch.is_grad_enabled():
            weight.register_hook(self._record)
        return weight

    def _record(self, grad: Tensor) -> None:
        grad = grad.detach()
        self.grad = grad.clone() if self.grad is None else self.grad.add_(grad)


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


class DynamicSparseTraining:
    """Drop the smallest-magnitude weights and regrow others, at constant sparsity. Subclasses define the
    growth rule (``grow_scores``) and may change the drop rule (``drop``) and the fraction (``fraction``);
    see ``SET``, ``SETCosine`` and ``RigL``.

    Args:
        model: the network (DDP-wrapped or not). Targets that already have masks keep them (their current
            sparsity is kept); the others get a random mask at their allocated sparsity.
        sparsity: overall fraction of the targets' weights that is zero, in [0, 1).
        end: the last step at which masks may change (RigL: 75% of training).
        update_every: steps between mask updates (Delta T).
        alpha: initial update fraction, decaying on a cosine to 0 at ``end``.
        distribution: ``"erk"`` (Erdős–Rényi-Kernel) or ``"uniform"`` per-layer sparsities.
        optimizer: when given, the state of regrown weights is cleared.
        targets, exclude: as in ``prunekit.prune`` (default: every Linear and conv weight).
        seed: seeds the initial random masks and SET's random growth.
    """

    name = ""
    needs_dense_gradient = False

    def __init__(
        self,
        model: nn.Module,
        sparsity: float = 0.9,
        *,
        end: int,
        update_every: int = 100,
        alpha: float = 0.3,
        distribution: str = "erk",
        optimizer: torch.optim.Optimizer | None = None,
        targets: Iterable[str | type[nn.Module]] | str | None = None,
        exclude: Iterable[str] | str = (),
        seed: int = 0,
    ) -> None:
        self.sparsity = check_sparsity(sparsity)
        self.end = _check_int(end, "end", 1)
        self.update_every = _check_int(update_every, "update_every", 1)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        key = distribution.strip().lower() if isinstance(distribution, str) else distribution
        if key not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = key
        self.model = distributed.unwrap(model)
        self.optimizer = optimizer
        self.seed = int(seed)
        self.targets: list[Target] = resolve_targets(self.model, targets, exclude)
        self.step_count = 0
        self.history: list[Update] = []
        self._probes: list[tuple[Target, _DenseGradProbe]] = []
        self._init_masks()
        if self.is_update_step(1):
            self._arm()

    # --- allocation ---------------------------------------------------------------------------
    def layer_sparsities(self) -> dict[str, float]:
        """The allocated sparsity of every target (uniform or ERK)."""
        if self.distribution == "uniform":
            return {t.name: self.sparsity for t in self.targets}
        values = erk_sparsities([t.shape for t in self.targets], self.sparsity)
        return {t.name: s for t, s in zip(self.targets, values)}

    def _init_masks(self) -> None:
        allocation = self.layer_sparsities()
        fresh = {t.name: allocation[t.name] for t in self.targets if t.mask(self.model) is None}
        if fresh:
            prune(self.model, None, method="random", scope=fresh, targets=list(fresh), seed=self.seed)
        distributed.sync_masks(self.model)

    # --- the schedule -------------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        """Whether the masks change after optimizer step ``step`` (counted from 1)."""
        return step % self.update_every == 0 and step < self.end

    def fraction(self, step: int) -> float:
        """The fraction of each layer's active weights replaced at ``step``."""
        return cosine_update_fraction(step, self.alpha, self.end)

    def step(self) -> Update | None:
        """Call once after every ``optimizer.step()``. Updates the masks on update steps."""
        self.step_count += 1
        update = None
        if self.is_update_step(self.step_count):
            update = self.update(self.fraction(self.step_count))
        self._disarm()
        if self.is_update_step(self.step_count + 1):
            self._arm()
        return update

    # --- growth rules -------------------------------------------------------------------------
    def grow_scores(self, index: int, target: Target) -> Tensor:
        """Scores of the candidates for regrowth (higher grows first), the parameter's shape."""
        raise NotImplementedError

    def _arm(self) -> None:
        if not self.needs_dense_gradient or self._probes:
            return
        for target in self.targets:
            probe = _DenseGradProbe()
            for owner in target.owners:
                parametrize.register_parametrization(owner.module, owner.param_name, probe, unsafe=True)
            self._probes.append((target, probe))

    def _disarm(self) -> None:
        for target, probe in self._probes:
            for owner in target.owners:
                plist = owner.module.parametrizations[owner.param_name]
                for i in reversed(range(len(plist))):
                    if plist[i] is probe:
                        del plist[i]
        self._probes = []

    def dense_gradients(self) -> dict[str, Tensor]:
        """The recorded gradients of the effective weights (averaged over ranks under DDP)."""
        if not self._probes:
            raise RuntimeError(
                f"{self.name} grows by the dense gradient of the update step, recorded during its backward "
                "pass: let step() run the updates (call it once after every optimizer.step())"
            )
        grads = {}
        for target, probe in self._probes:
            if probe.grad is None:
                raise RuntimeError(
                    f"{self.name}: no gradient was recorded for {target.name}; call step() once after every "
                    "optimizer.step(), with a backward pass in between"
                )
            grads[target.name] = probe.grad
        values = list(grads.values())
        distributed.all_reduce_sum_(values)
        return grads

    # --- the update ---------------------------------------------------------------------------
    def update(self, fraction: float) -> Update:
        """Replace ``fraction`` of every layer's active weights now (drop by magnitude, grow by the rule)."""
        self._dense = self.dense_gradients() if self.needs_dense_gradient else {}
        new_masks, old_masks = {}, {}
        with torch.no_grad():
            for index, target in enumerate(self.targets):
                old = target.mask(self.model)
                old_masks[target.name] = old.clone()
                new_masks[target.name] = self._layer_update(index, target, old, fraction)
            if distributed.is_distributed():
                new_masks = distributed.broadcast_masks(new_masks)
            changed = {}
            for target in self.targets:
                new, old = new_masks[target.name], old_masks[target.name]
                masking.set_mask(self.model, target.name, new, owners=target.owners)
                moved = new & ~old  # grown: active now, inactive before
                changed[target.name] = int(moved.count_nonzero())
                self._reset_optimizer_state(target, ~(new & old))
        self._dense = {}
        record = Update(self.step_count, fraction, changed)
        self.history.append(record)
        return record

    def drop(self, target: Target, active: Tensor, fraction: float) -> Tensor:
        """The flat mask of weights still active after dropping ``fraction`` of ``active`` (flat, bool):
        here the smallest ``|w|``."""
        n = int(active.count_nonzero())
        k = int(fraction * n)
        weights = target.parameter.detach().reshape(-1).abs().float()
        kept = torch.zeros_like(active)
        kept[torch.topk(weights.masked_fill(~active, float("-inf")), n - k, sorted=False).indices] = True
        return kept

    def _layer_update(self, index: int, target: Target, mask: Tensor, fraction: float) -> Tensor:
        flat_mask = mask.reshape(-1)
        if int(flat_mask.count_nonzero()) == flat_mask.numel():
            return mask.clone()
        kept = self.drop(target, flat_mask, fraction)
        k = int(flat_mask.count_nonzero()) - int(kept.count_nonzero())
        if k == 0:
            return mask.clone()
        grow = self.grow_scores(index, target).reshape(-1).float().masked_fill(kept, float("-inf"))
        kept[torch.topk(grow, k, sorted=False).indices] = True
        return kept.reshape(mask.shape)

    def _reset_optimizer_state(self, target: Target, changed: Tensor) -> None:
        if self.optimizer is None:
            return
        state = self.optimizer.state.get(target.parameter)
        if not state:
            return
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == changed.shape:
                value.masked_fill_(changed, 0)

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The step counter (the masks live in the model's state dict)."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self._disarm()
        self.step_count = int(state["step_count"])
        if self.is_update_step(self.step_count + 1):
            self._arm()

    def close(self) -> None:
        """Remove the gradient probes if any are attached (call before ``finalize`` when stopping early)."""
        self._disarm()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sparsity={self.sparsity}, distribution={self.distribution!r}, "
            f"update_every={self.update_every}, end={self.end}, alpha={self.alpha})"
        )


def _random_growth(dst: DynamicSparseTraining, index: int, target: Target) -> Tensor:
    """Seeded uniform scores: one generator per (seed, step, layer)."""
    generator = torch.Generator().manual_seed(dst.seed * 1_000_003 + dst.step_count * 1009 + index)
    return torch.rand(target.shape, generator=generator).to(target.parameter.device)


class SET(DynamicSparseTraining):
    """Sparse Evolutionary Training (Mocanu et al. 2018): at every update, drop the fraction ``zeta`` of the
    smallest positive weights and ``zeta`` of the largest negative weights, then regrow as many at random.

    ``zeta`` is constant (the paper: 0.3, one update per epoch, so ``update_every`` = steps per epoch).
    Active weights that are exactly zero lie between the two thresholds and go too, as in the reference
    implementation (a regrown weight that no gradient moved). Regrown weights start at zero, not at a
    random value as in the paper. Other arguments as in ``DynamicSparseTraining`` (``alpha`` is not used).
    """

    name = "set"

    def __init__(self, model: nn.Module, sparsity: float = 0.9, *, zeta: float = 0.3, **kwargs) -> None:
        if isinstance(zeta, bool) or not isinstance(zeta, (int, float)) or not 0.0 < zeta <= 1.0:
            raise ValueError(f"zeta must be in (0, 1], got {zeta!r}")
        self.zeta = float(zeta)
        super().__init__(model, sparsity, **kwargs)

    def fraction(self, step: int) -> float:
        """``zeta`` before ``end``, 0 from ``end`` on: constant, as in the paper."""
        return self.zeta if step < self.end else 0.0

    def drop(self, target: Target, active: Tensor, fraction: float) -> Tensor:
        w = target.parameter.detach().reshape(-1).float()
        positive, negative = active & (w > 0), active & (w < 0)
        kept = positive | negative  # exact zeros go
        k_pos, k_neg = int(fraction * int(positive.count_nonzero())), int(fraction * int(negative.count_nonzero()))
        if k_pos:  # the smallest positive weights
            kept[torch.topk(w.masked_fill(~positive, float("inf")), k_pos, largest=False).indices] = False
        if k_neg:  # the largest (closest to zero) negative weights
            kept[torch.topk(w.masked_fill(~negative, float("-inf")), k_neg).indices] = False
        return kept

    def grow_scores(self, index: int, target: Target) -> Tensor:
        return _random_growth(self, index, target)

    def __repr__(self) -> str:
        return (
            f"SET(sparsity={self.sparsity}, distribution={self.distribution!r}, "
            f"update_every={self.update_every}, end={self.end}, zeta={self.zeta})"
        )


class SETCosine(DynamicSparseTraining):
    """RigL's drop rule (the fraction ``alpha/2 (1 + cos(pi t / end))`` of the smallest ``|w|``, both signs
    together) with SET's random growth: the "SET" baseline of Evci et al. 2020, not Mocanu et al.'s rule."""

    name = "set_cosine"

    def grow_scores(self, index: int, target: Target) -> Tensor:
        return _random_growth(self, index, target)


class RigL(DynamicSparseTraining):
    """Rigging the Lottery (Evci et al. 2020): drop the smallest magnitudes, regrow where the dense gradient
    of the loss is largest in magnitude."""

    name = "rigl"
    needs_dense_gradient = True

    def grow_scores(self, index: int, target: Target) -> Tensor:
        return self._dense[target.name].abs()
