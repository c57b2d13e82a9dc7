"""Targeted dropout (Gomez et al. 2019): dropout aimed at the weights a later pruning will remove.

During training, in every layer, the *targeted* entries are the fraction ``targeted`` (gamma) of lowest
magnitude, and each of them is dropped with probability ``rate`` (alpha) at every forward pass (a fresh
draw each time, no rescaling, as in the reference code). The network learns not to rely on them, so
pruning exactly them afterwards costs little. In evaluation mode the weights are used as they are.

* ``mode="weight"``: per output unit (a row of a Linear weight, a filter of a convolution), the fraction
  ``targeted`` of its weights with the smallest ``|w|``;
* ``mode="unit"``: the fraction ``targeted`` of the layer's output units with the smallest L2 norm, dropped
  whole.

    td = TargetedDropout(model, targeted=0.75, rate=0.5)
    ... train as usual ...
    td.to_masks()          # prune the targeted entries (or td.remove() and prune any other way)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from ..targets import Target, resolve_targets
from ._wrap import attach_masks, attach_parametrization, detach_parametrization

__all__ = ["TargetedDropout", "targeted_mask", "MODES"]

MODES = ("weight", "unit")


def targeted_mask(weight: Tensor, targeted: float, mode: str = "weight", out_dim: int = 0) -> Tensor:
    """Bool mask of the targeted entries: per unit the ``floor(targeted * fan_in)`` smallest ``|w|``
    (``weight``), or the ``floor(targeted * units)`` units of smallest L2 norm, whole (``unit``)."""
    w = weight.detach().movedim(out_dim, 0)
    rows = w.reshape(w.shape[0], -1)
    if mode == "weight":
        k = int(targeted * rows.shape[1])
        out = torch.zeros_like(rows, dtype=torch.bool)
        if k:
            out.scatter_(1, torch.argsort(rows.abs(), dim=1, stable=True)[:, :k], True)
    else:
        k = int(targeted * rows.shape[0])
        chosen = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        if k:
            chosen[torch.argsort(rows.norm(dim=1), stable=True)[:k]] = True
        out = chosen.unsqueeze(1).expand_as(rows)
    return out.reshape(w.shape).movedim(0, out_dim)


class _TargetedDropout(nn.Module):
    def __init__(self, owner: TargetedDropout, out_dim: int) -> None:
        super().__init__()
        self._owner = [owner]  # a list, so the controller is not registered as a submodule
        self.out_dim = out_dim

    def forward(self, weight: Tensor) -> Tensor:
        owner = self._owner[0]
        if not self.training or owner.rate == 0 or owner.targeted == 0:
            return weight
        target = targeted_mask(weight, owner.targeted, owner.mode, self.out_dim)
        if owner.mode == "unit":  # one draw per unit
            shape = [1] * weight.dim()
            shape[self.out_dim] = weight.shape[self.out_dim]
            drop = torch.rand(shape, device=weight.device) < owner.rate
        else:
            drop = torch.rand_like(weight) < owner.rate
        return weight * ~(target & drop)


class TargetedDropout:
    """Targeted dropout on the targets' weights (see the module docstring).

    Args:
        targeted: gamma, the fraction targeted per unit (``weight``) or per layer (``unit``), in [0, 1).
        rate: alpha, the probability that a targeted entry is dropped, in [0, 1].
        mode: ``"weight"`` or ``"unit"``.
        targets, exclude: as in ``prunekit.prune``.
    """

    def __init__(self, model: nn.Module, targeted: float = 0.5, rate: float = 0.5, mode: str = "weight", *,
                 targets: Iterable[str | type[nn.Module]] | str | None = None,
                 exclude: Iterable[str] | str = ()) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for what, value, top in (("targeted", targeted, 1.0), ("rate", rate, 1.0 + 1e-12)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < top:
                raise ValueError(f"{what} must be in [0, 1{')' if what == 'targeted' else ']'}, got {value!r}")
        self.targeted, self.rate, self.mode = float(targeted), float(rate), mode
        self.model = unwrap(model)
        self.targets: list[Target] = resolve_targets(self.model, targets, exclude)
        self.modules: dict[str, _TargetedDropout] = {}
        for t in self.targets:
            module = _TargetedDropout(self, t.out_dim)
            module.train(self.model.training)
            attach_parametrization(t, module)
            self.modules[t.name] = module
        self._attached = True

    def remove(self) -> None:
        """Take targeted dropout off (the weights are unchanged)."""
        if not self._attached:
            raise RuntimeError("targeted dropout was already removed")
        for t in self.targets:
            detach_parametrization(t, self.modules[t.name])
        self._attached = False

    def to_masks(self) -> dict[str, Tensor]:
        """Remove targeted dropout and prune exactly the targeted entries (prunekit masks)."""
        self.remove()
        with torch.no_grad():
            keep = {t.name: ~targeted_mask(t.value, self.targeted, self.mode, t.out_dim) for t in self.targets}
            return attach_masks(self.model, keep, self.targets)
