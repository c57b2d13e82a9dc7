"""Dynamic network surgery (Guo, Yao & Chen 2016): pruning and splicing with two thresholds in training.

Each target weight ``W`` gets a binary mask ``T``; the forward pass uses ``W * T`` and the backward pass
updates *every* entry of ``W`` with the gradient of the masked weight (straight-through on ``T``), so a
pruned weight keeps learning and comes back ("splicing") when it grows. After an optimizer step the mask
is revised, with probability ``(1 + gamma * t) ^ -power`` at step ``t`` (and never after ``stop``):

    T = 0 where |W| < a,   T = 1 where |W| > b,   T unchanged where a <= |W| <= b,

with ``a = 0.9 * max(mu + c * sigma, 0)`` and ``b = 1.1 * max(mu + c * sigma, 0)``, ``mu`` and ``sigma`` the
mean and standard deviation of the layer's ``|W|`` when surgery starts, and ``c`` the compression rate of
the reference implementation (larger ``c``: higher thresholds, sparser layers; ``gamma = 1e-4``,
``power = 1`` are its defaults). The gap between ``a`` and ``b`` keeps weights near the threshold from
flickering in and out.

    dns = DynamicNetworkSurgery(model, c=0.5)      # the first surgery happens here
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        dns.step()
    dns.to_masks()                                    # plain prunekit masks; the raw weights are kept
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from ..targets import Target, resolve_targets
from ._wrap import attach_parametrization, masks_sparsity, replace_with_masks

__all__ = ["DynamicNetworkSurgery", "surgery_thresholds"]


def surgery_thresholds(weight: Tensor, c: float) -> tuple[float, float]:
    """``(a, b) = (0.9 r, 1.1 r)``, ``r = max(mean|W| + c * std|W|, 0)`` (population std)."""
    magnitude = weight.detach().abs().double()
    r = max(float(magnitude.mean() + c * magnitude.std(unbiased=False)), 0.0)
    return 0.9 * r, 1.1 * r


class _SurgeryMask(nn.Module):
    """Parametrization: forward ``W * T``, backward the identity (every entry of ``W`` gets the gradient)."""

    def __init__(self, shape: tuple[int, ...], device=None) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, device=device))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (weight * (self.mask - 1)).detach()


class DynamicNetworkSurgery:
    """Pruning and splicing of the targets' weights during training (see the module docstring).

    Args:
        model: the network (usually trained already: surgery starts from its weights).
        c: compression rate, a float or ``{layer name: c}`` for the targets (default 0 for those not named).
        gamma, power: the revision probability ``(1 + gamma t) ^ -power``.
        stop: no revision from this step on (None: never stop).
        seed: seeds the revision draws.
        targets, exclude: as in ``prunekit.prune``.
    """

    def __init__(self, model: nn.Module, c: float | dict[str, float] = 0.0, *, gamma: float = 1e-4,
                 power: float = 1.0, stop: int | None = None, seed: int = 0,
                 targets: Iterable[str | type[nn.Module]] | str | None = None,
                 exclude: Iterable[str] | str = ()) -> None:
        if gamma < 0 or power < 0:
            raise ValueError(f"gamma and power must be >= 0, got gamma={gamma!r}, power={power!r}")
        self.model = unwrap(model)
        self.targets: list[Target] = resolve_targets(self.model, targets, exclude)
        rates = c if isinstance(c, dict) else {t.name: c for t in self.targets}
        unknown = set(rates) - {t.name for t in self.targets}
        if unknown:
            raise ValueError(f"c names {', '.join(sorted(unknown))}, which are not targets")
        self.gamma, self.power, self.stop = float(gamma), float(power), stop
        self.generator = torch.Generator().manual_seed(seed)
        self.thresholds = {t.name: surgery_thresholds(t.value, float(rates.get(t.name, 0.0))) for t in self.targets}
        self.masks: dict[str, _SurgeryMask] = {}
        for t in self.targets:
            module = _SurgeryMask(t.shape, t.parameter.device)
            attach_parametrization(t, module)
            self.masks[t.name] = module
        self.step_count = 0
        self._attached = True
        self.revise()

    def update_probability(self, step: int) -> float:
        """``(1 + gamma * step) ^ -power``, 0 from ``stop`` on."""
        if self.stop is not None and step >= self.stop:
            return 0.0
        return (1.0 + self.gamma * step) ** -self.power

    def revise(self) -> None:
        """One surgery: prune below ``a``, splice back above ``b``, leave the band between as it is."""
        with torch.no_grad():
            for t in self.targets:
                a, b = self.thresholds[t.name]
                magnitude = t.parameter.detach().abs()
                mask = self.masks[t.name].mask
                mask.masked_fill_(magnitude < a, 0.0).masked_fill_(magnitude > b, 1.0)

    def step(self) -> bool:
        """Call after every optimizer step: revises the masks with the schedule's probability. Returns
        whether it did."""
        if not self._attached:
            raise RuntimeError("surgery has ended (to_masks was called)")
        self.step_count += 1
        draw = float(torch.rand((), generator=self.generator))
        if draw < self.update_probability(self.step_count):
            self.revise()
            return True
        return False

    def binary_masks(self) -> dict[str, Tensor]:
        return {name: m.mask.bool().clone() for name, m in self.masks.items()}

    def sparsity(self) -> float:
        return masks_sparsity(self.binary_masks())

    def to_masks(self) -> dict[str, Tensor]:
        """End surgery: the current masks become prunekit masks (pruned weights then stay at zero)."""
        if not self._attached:
            raise RuntimeError("surgery has already ended")
        keep = self.binary_masks()
        masks = replace_with_masks(self.model, self.targets, self.masks, keep)
        self._attached = False
        return masks
