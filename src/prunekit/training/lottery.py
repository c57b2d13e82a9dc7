"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2019).

Train; prune ``rate`` of the weights that remain (by magnitude, globally by default); rewind the survivors
to their initial values (``rewind_step=0``) or to their values after ``rewind_step`` optimizer steps;
retrain; repeat. After ``rounds`` rounds the sparsity is ``1 - (1 - rate) ** rounds``. The control is
the same mask on a random re-initialisation (``reinitialize`` / ``LotteryTicket.control``).

    ticket = LotteryTicket(model, rate=0.2, rewind_step=0)
    history = ticket.run(lambda m, cb: train(m, loader, epochs=10, callback=cb), rounds=10)

``train_fn(model, callback)`` trains the model and calls ``callback(step)`` after every optimizer step
(``prunekit.data.train`` does); what it returns (an accuracy, say) is kept in the history.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import masking
from ..distributed import unwrap
from ..pruning import PruneReport, PruningSpec, prune
from ..scope import Scope
from .rewinding import Checkpoint, capture, named_checkpoint_buffers, named_raw_parameters, rewind_weights

__all__ = ["LotteryTicket", "LotteryRound", "reinitialize"]


@dataclass
class LotteryRound:
    """One training run of the procedure: its round (0 = dense), the sparsity it trained at, its result."""

    round: int
    sparsity: float
    result: object = None


class LotteryTicket:
    """Iterative magnitude pruning with rewinding.

    Args:
        model: the network, untrained (its current values are the initialisation).
        rate: fraction of the *remaining* weights pruned each round (0.2 in Frankle & Carbin).
        rewind_step: rewind to the values after this many optimizer steps of the first run (0 = reset to
            initialisation; a small k is "late resetting", which Frankle et al. 2019 need for deeper nets).
        method, scope, targets, exclude, max_layer_sparsity: as in ``prunekit.prune`` (magnitude, global).
    """

    def __init__(
        self,
        model: nn.Module,
        rate: float = 0.2,
        rewind_step: int = 0,
        *,
        method: str = "magnitude",
        scope: str | Mapping[str, float] | Scope = "global",
        targets: Iterable[str | type[nn.Module]] | str | None = None,
        exclude: Iterable[str] | str = (),
        max_layer_sparsity: float | None = None,
    ) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
            raise ValueError(f"rate must be in (0, 1), got {rate!r}")
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
            raise ValueError(f"rewind_step must be an integer >= 0, got {rewind_step!r}")
        self.model = unwrap(model)
        self.rate = float(rate)
        self.rewind_step = rewind_step
        self._prune_kwargs = dict(
            method=method, scope=scope, targets=targets, exclude=exclude, max_layer_sparsity=max_layer_sparsity
        )
        self._spec = PruningSpec(self.model, method, "element", scope, targets, exclude,
                                 max_layer_sparsity=max_layer_sparsity)  # validates everything now
        self.rounds_done = 0
        self.checkpoint: Checkpoint | None = capture(self.model, step=0) if rewind_step == 0 else None
        self._steps_seen = 0
        self.history: list[LotteryRound] = []

    @property
    def sparsity(self) -> float:
        """Current sparsity over the targets."""
        total = sum(t.numel() for t in self._spec.targets)
        kept = sum(t.numel() if (m := t.mask(self.model)) is None else int(m.count_nonzero()) for t in self._spec.targets)
        return 1.0 - kept / total

    def observe(self, step: int | None = None) -> None:
        """Call after every optimizer step of the first (dense) run; captures the rewind point.

        ``step`` counts optimizer steps from 1 (``prunekit.data.train``'s callback argument); without it
        the calls are counted.
        """
        self._steps_seen = self._steps_seen + 1 if step is None else int(step)
        if self.checkpoint is None and self._steps_seen == self.rewind_step:
            self.checkpoint = capture(self.model, step=self.rewind_step)

    def prune(self) -> PruneReport:
        """Prune ``rate`` of the remaining weights: the sparsity goes to ``1 - (1 - rate) ** (rounds + 1)``."""
        goal = 1.0 - (1.0 - self.rate) ** (self.rounds_done + 1)
        report = prune(self.model, goal, **self._prune_kwargs)
        self.rounds_done += 1
        return report

    def rewind(self) -> None:
        """Reset the surviving weights to the rewind point (pruned ones stay zero)."""
        if self.checkpoint is None:
            raise RuntimeError(
                f"no weights saved at step {self.rewind_step}: call observe() after every optimizer step of "
                f"the first training run (it saw {self._steps_seen} steps)"
            )
        rewind_weights(self.model, self.checkpoint)

    def run(self, train_fn: Callable[[nn.Module, Callable], object], rounds: int) -> list[LotteryRound]:
        """Train, then ``rounds`` times prune, rewind and retrain. The model ends as the trained ticket at
        sparsity ``1 - (1 - rate) ** rounds``. Returns one ``LotteryRound`` per training run."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        for r in range(rounds + 1):
            callback = self.observe if r == 0 and self.rounds_done == 0 else (lambda step=None: None)
            result = train_fn(self.model, callback)
            self.history.append(LotteryRound(self.rounds_done, self.sparsity, result))
            if r < rounds:
                self.prune()
                self.rewind()
        return self.history

    def control(self, seed: int = 0, factory: Callable[[], nn.Module] | None = None) -> nn.Module:
        """The random re-initialisation control: a copy of the model with the same masks and fresh random
        weights (see ``reinitialize``). Call it when the mask is final, before or after retraining."""
        twin = copy.deepcopy(self.model)
        reinitialize(twin, seed=seed, factory=factory)
        return twin


def _reset_module_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Fresh values of ``module``'s own parameters and buffers from its ``reset_parameters``, computed on
    an unmasked copy (the module itself is not touched)."""
    twin = copy.deepcopy(module)
    for sub in twin.modules():
        if parametrize.is_parametrized(sub):
            masking.own_class(sub)
            for name in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=False)
    twin.reset_parameters()
    return {**dict(twin.named_parameters(recurse=False)), **dict(twin.named_buffers(recurse=False))}


def reinitialize(model: nn.Module, seed: int | None = 0, factory: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Draw fresh random weights for ``model`` in place, keeping its masks (pruned entries stay zero).

    With ``factory`` (a function building the same architecture, e.g. the model's class) the new values
    come from a new instance, so they follow the model's own initialisation exactly; without it every
    module's ``reset_parameters`` is used. Buffers (BatchNorm statistics) are reset too. ``seed`` seeds
    the draw (the global RNG is left as it was); ``None`` draws from the global RNG.
    """
    model = unwrap(model)
    params = named_raw_parameters(model)
    buffers = named_checkpoint_buffers(model)
    fresh: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if factory is not None:
            new = factory()
            fresh = {**named_raw_parameters(new), **named_checkpoint_buffers(new)}
            missing = [n for n in params if n not in fresh]
            if missing:
                raise ValueError(f"the factory's model has no {', '.join(missing)}: it is not the same architecture")
        else:
            for module_name, module in model.named_modules():
                if isinstance(module, (masking.PruningMask, parametrize.ParametrizationList)):
                    continue
                if callable(getattr(module, "reset_parameters", None)):
                    prefix = f"{module_name}." if module_name else ""
                    fresh.update({prefix + n: v for n, v in _reset_module_parameters(module).items()})
    targets = {**buffers, **params}
    for name, value in fresh.items():
        if name in targets and tuple(targets[name].shape) != tuple(value.shape):
            raise ValueError(f"{name}: the fresh value has shape {tuple(value.shape)}, the model {tuple(targets[name].shape)}")
    current = masking.masks(model)
    with torch.no_grad():
        for name, value in fresh.items():
            if name in targets:
                targets[name].copy_(value.detach().to(targets[name].device, targets[name].dtype))
        for name, mask in current.items():
            params[name].masked_fill_(~mask, 0)
    return model
