"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma 2018).

Every gated unit (a weight, or a whole output neuron / channel) is multiplied by a gate z in [0, 1]:

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  z = min(1, max(0, s (zeta - gamma) + gamma))

with beta = 2/3, gamma = -0.1, zeta = 1.1. The expected L0 norm is differentiable in log_alpha:

    P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))

At evaluation time the gates are deterministic, z = min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma)),
so some are exactly 0. ``to_masks`` bakes the deterministic gates into the weights and turns the zeros
into prunekit masks (for neurons and channels: whole rows of the weight, and the bias), after which the
model is a plain masked model computing exactly what the gated model computed in eval mode;
``to_structured`` goes on to remove the closed neurons and channels physically (``prunekit.structured``).

    l0 = L0(model, granularity="weight")            # or "neuron" / "channel"
    optimizer = torch.optim.Adam(model.parameters())  # after wrapping: the gates are parameters too
    loss = F.cross_entropy(model(x), y) + lam * l0.penalty()
    ...
    l0.to_masks()
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .. import masking
from ..distributed import unwrap
from ..targets import Target, resolve_targets
from ._wrap import (
    attach_masks,
    attach_parametrization,
    check_supported,
    detach_parametrization,
)

__all__ = ["HardConcrete", "L0", "BETA", "GAMMA", "ZETA", "GRANULARITIES"]

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
GRANULARITIES = ("weight", "neuron", "channel")
_EPS = 1e-6
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


class HardConcrete(nn.Module):
    """A tensor of hard-concrete gates with learnable ``log_alpha`` (shape ``shape``).

    ``log_alpha`` starts at ``log((1 - droprate_init) / droprate_init)`` plus N(0, 0.01^2) noise, as in
    the reference implementation.
    """

    def __init__(
        self, shape: tuple[int, ...], droprate_init: float = 0.5, beta: float = BETA, gamma: float = GAMMA,
        zeta: float = ZETA, device=None,
    ) -> None:
        super().__init__()
        if not 0.0 < droprate_init < 1.0:
            raise ValueError(f"droprate_init must be in (0, 1), got {droprate_init!r}")
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise ValueError(f"hard-concrete needs gamma < 0 < 1 < zeta and beta > 0, got {gamma}, {zeta}, {beta}")
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        mean = math.log(1.0 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.Parameter(torch.randn(shape, device=device) * 1e-2 + mean)

    def sample(self) -> Tensor:
        """A stochastic gate (reparametrised, differentiable in ``log_alpha``)."""
        u = torch.rand_like(self.log_alpha).clamp(_EPS, 1.0 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> Tensor:
        """The test-time gate: min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))."""
        return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def gate(self) -> Tensor:
        return self.sample() if self.training else self.deterministic()

    def prob_nonzero(self) -> Tensor:
        """P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)), per gate."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))


class _WeightGates(HardConcrete):
    """Parametrization: weight * z, one gate per weight."""

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.gate()


def _unit_hook(gate: HardConcrete, conv: bool, weight_dims: int):
    def hook(module: nn.Module, inputs, output: Tensor) -> Tensor:
        z = gate.gate()
        if conv:
            batched = output.dim() == weight_dims
            z = z.view(-1, *([1] * (output.dim() - (2 if batched else 1))))
        return output * z

    return hook


class L0:
    """Hard-concrete L0 gates on the weights (``"weight"``) or the output units (``"neuron"`` for
    Linear layers, ``"channel"`` for convolutions: the two names mean the same thing, a gate on each
    output unit, multiplying the unit's output, bias included) of the targets.

    Args:
        model: the network. Wrap it *before* building the optimizer (the gates are parameters) and before
            DDP (so DDP sees them).
        granularity: ``"weight"``, ``"neuron"`` or ``"channel"``.
        targets, exclude: as in ``prunekit.prune`` (default: every Linear and conv weight).
        droprate_init: the initial probability that a gate is closed (0.5 in the paper).
        beta, gamma, zeta: the hard-concrete constants (2/3, -0.1, 1.1).
    """

    def __init__(
        self,
        model: nn.Module,
        granularity: str = "weight",
        *,
        targets: Iterable[str | type[nn.Module]] | str | None = None,
        exclude: Iterable[str] | str = (),
        droprate_init: float = 0.5,
        beta: float = BETA,
        gamma: float = GAMMA,
        zeta: float = ZETA,
    ) -> None:
        key = granularity.strip().lower() if isinstance(granularity, str) else granularity
        if key not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = key
        self.model = unwrap(model)
        self.targets: list[Target] = resolve_targets(self.model, targets, exclude)
        for target in self.targets:
            check_supported(target, _LAYERS, "L0")
            if key != "weight" and len(target.owners) > 1:
                raise ValueError(f"{target.name} is tied to other layers; use granularity='weight' for it")
        self.gates: dict[str, HardConcrete] = {}
        self._hooks = {}
        kwargs = dict(droprate_init=droprate_init, beta=beta, gamma=gamma, zeta=zeta)
        for target in self.targets:
            device = target.parameter.device
            if key == "weight":
                gate = _WeightGates(target.shape, device=device, **kwargs)
                attach_parametrization(target, gate)
            else:
                gate = HardConcrete((target.shape[target.out_dim],), device=device, **kwargs)
                module = target.module
                module.add_module("l0_gate", gate)
                conv = isinstance(module, nn.modules.conv._ConvNd)
                self._hooks[target.name] = module.register_forward_hook(_unit_hook(gate, conv, len(target.shape)))
            self.gates[target.name] = gate
        self._attached = True

    def parameters(self) -> list[nn.Parameter]:
        """The gates' ``log_alpha`` tensors (give them a parameter group of their own: with Adam, a
        learning rate around 10x the weights' lets the gates close within a short training)."""
        return [g.log_alpha for g in self.gates.values()]

    def _group_size(self, target: Target) -> int:
        return 1 if self.granularity == "weight" else target.numel() // target.shape[target.out_dim]

    def expected_l0(self) -> Tensor:
        """Expected number of non-zero weights: sum over gates of P(z != 0) times the weights it gates."""
        return sum(self.gates[t.name].prob_nonzero().sum() * self._group_size(t) for t in self.targets)

    def penalty(self) -> Tensor:
        """The expected L0 norm as a fraction of the gated weights (in [0, 1]): add ``lam * penalty()``."""
        return self.expected_l0() / sum(t.numel() for t in self.targets)

    def deterministic_gates(self) -> dict[str, Tensor]:
        """The test-time gates of every target."""
        with torch.no_grad():
            return {name: gate.deterministic() for name, gate in self.gates.items()}

    def sparsity(self) -> float:
        """Fraction of the gated weights whose test-time gate is exactly zero."""
        zero = sum(int((self.gates[t.name].deterministic() == 0).sum()) * self._group_size(t) for t in self.targets)
        return zero / sum(t.numel() for t in self.targets)

    def _unit_keep(self, target: Target, z: Tensor) -> Tensor:
        shape = [1] * len(target.shape)
        shape[target.out_dim] = -1
        return z.view(shape).expand(target.shape)

    def to_masks(self) -> dict[str, Tensor]:
        """Bake the test-time gates into the weights, mask the zeros and remove the gates.

        For neurons and channels the whole row of the weight and the bias entry are scaled and masked,
        so a closed unit outputs exactly zero. The model then computes what the gated model computed in
        eval mode. Returns the masks of the targets (biases included for units).
        """
        self._check_attached()
        gates = self.deterministic_gates()
        out = {}
        with torch.no_grad():
            for target in self.targets:
                z = gates[target.name]
                weight_z = z if self.granularity == "weight" else self._unit_keep(target, z)
                target.parameter.mul_(weight_z.to(target.parameter.dtype))
                bias = getattr(target.module, "bias", None) if self.granularity != "weight" else None
                if bias is not None:
                    masking.raw_parameter(target.module, "bias").mul_(z.to(bias.dtype))
            self.remove()
            for target in self.targets:
                z = gates[target.name]
                weight_z = z if self.granularity == "weight" else self._unit_keep(target, z)
                out[target.name] = weight_z > 0
                if self.granularity != "weight" and getattr(target.module, "bias", None) is not None:
                    prefix = f"{target.module_name}." if target.module_name else ""
                    out[prefix + "bias"] = z > 0
            return attach_masks(self.model, out, self.targets)

    def remove(self) -> None:
        """Take the gates off without changing the weights (training can go on ungated)."""
        self._check_attached()
        for target in self.targets:
            gate = self.gates[target.name]
            if self.granularity == "weight":
                detach_parametrization(target, gate)
            else:
                self._hooks.pop(target.name).remove()
                del target.module.l0_gate
        self._attached = False

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("the L0 gates were already removed (to_masks() or remove() was called)")

    def to_structured(self, example_inputs, **kwargs):
        """For neuron/channel gates: ``to_masks`` and then physical removal of the closed units (and of
        everything coupled to them: the next layers' inputs, normalisation, residual partners) with
        ``prunekit.structured.remove_dead``; the outputs do not change. Returns its report."""
        if self.granularity == "weight":
            raise ValueError("to_structured() needs granularity='neuron' or 'channel'; use to_masks() for weights")
        from ..structured import remove_dead  # loaded on first use, as prunekit loads pk.structured

        self.to_masks()
        return remove_dead(self.model, example_inputs, **kwargs)

    def structured(self) -> dict[str, Tensor]:
        """For neuron/channel gates: ``{layer name: bool tensor of the output units kept}`` (test-time
        gates), the input of physical channel removal."""
        if self.granularity == "weight":
            raise ValueError("structured() needs granularity='neuron' or 'channel'")
        return {t.module_name: (g > 0) for t, g in zip(self.targets, self.deterministic_gates().values())}

    def __repr__(self) -> str:
        return f"L0(granularity={self.granularity!r}, targets={len(self.targets)})"

