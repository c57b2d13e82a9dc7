"""Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017).

Each weight has a Gaussian posterior N(theta, sigma^2) with its own variance, parametrised additively
(``log_sigma2`` is learned, and log alpha = log sigma^2 - log theta^2), which keeps the gradient variance
low for large alpha. Training uses the local reparametrisation trick: a layer outputs

    mu = x theta^T + b,   var = x^2 sigma^2^T,   y = mu + sqrt(var) * eps,   eps ~ N(0, 1)

and the loss is the negative ELBO per training example: ``cross_entropy + kl_weight * kl() / N``. The KL
divergence to the log-uniform prior is the paper's approximation

    -KL ~= k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1,   k1 = 0.63576, k2 = 1.87320, k3 = 1.48695

At evaluation time the weights with log alpha > 3 (a dropout rate above ~95%) are zero and the others are
theta. ``to_masks`` turns that into prunekit masks and removes the variational machinery.

    vd = SparseVD(model)
    optimizer = torch.optim.Adam(model.parameters())   # after wrapping: log_sigma2 is a parameter
    loss = F.cross_entropy(model(x), y) + kl_weight * vd.kl() / len(train_set)
    ...
    vd.to_masks()
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import unwrap
from ..targets import Target, resolve_targets
from ._wrap import (
    attach_masks,
    attach_parametrization,
    check_supported,
    detach_parametrization,
    masks_sparsity,
)

__all__ = ["SparseVD", "kl_approximation", "K1", "K2", "K3", "THRESHOLD"]

K1, K2, K3 = 0.63576, 1.87320, 1.48695
THRESHOLD = 3.0
_LOG_ALPHA_CLAMP = 10.0
_EPS = 1e-8
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def kl_approximation(log_alpha: Tensor) -> Tensor:
    """KL(q || log-uniform prior) per weight, Molchanov et al. 2017 eq. 14 (its negative is approximated):
    ``k1 - k1 sigmoid(k2 + k3 log alpha) + 0.5 log(1 + 1/alpha)``."""
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)


class _Variational(nn.Module):
    """Parametrization holding ``log_sigma2``: identity in training (the noise is added to the layer's
    output by a forward hook), ``theta * (log alpha < threshold)`` in evaluation."""

    def __init__(self, shape: tuple[int, ...], init_log_sigma2: float, threshold: float, device=None) -> None:
        super().__init__()
        self.log_sigma2 = nn.Parameter(torch.full(shape, float(init_log_sigma2), device=device))
        self.threshold = float(threshold)

    def log_alpha(self, theta: Tensor) -> Tensor:
        """log alpha = log sigma^2 - log theta^2, clamped to [-10, 10] as in the reference code."""
        return (self.log_sigma2 - torch.log(theta.square() + _EPS)).clamp(-_LOG_ALPHA_CLAMP, _LOG_ALPHA_CLAMP)

    def forward(self, theta: Tensor) -> Tensor:
        if self.training:
            return theta
        return theta * (self.log_alpha(theta) < self.threshold)


def _noise_hook(param: _Variational):
    def hook(module: nn.Module, inputs, output: Tensor) -> Tensor:
        if not module.training:
            return output
        x = inputs[0]
        theta = module.weight  # the effective weight (masked entries are 0 and get no variance)
        sigma2 = torch.exp(param.log_sigma2) * (theta != 0)
        if isinstance(module, nn.Linear):
            var = F.linear(x.square(), sigma2)
        else:
            var = module._conv_forward(x.square(), sigma2, None)
        std = torch.sqrt(var + _EPS) * (var > 0)  # no variance at all (masked weights): no noise
        return output + std * torch.randn_like(output)

    return hook


class SparseVD:
    """Sparse variational dropout on the weights of the targets (Linear and Conv1d/2d/3d layers).

    Args:
        model: the network; wrap it before building the optimizer and before DDP.
        targets, exclude: as in ``prunekit.prune`` (default: every Linear and conv weight).
        init_log_sigma2: initial log sigma^2 (-10, as in the reference code: almost deterministic).
        threshold: weights with log alpha above it are pruned (3).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        targets: Iterable[str | type[nn.Module]] | str | None = None,
        exclude: Iterable[str] | str = (),
        init_log_sigma2: float = -10.0,
        threshold: float = THRESHOLD,
    ) -> None:
        self.model = unwrap(model)
        self.targets: list[Target] = resolve_targets(self.model, targets, exclude)
        for target in self.targets:
            check_supported(target, _LAYERS, "SparseVD")
            if len(target.owners) > 1:
                raise ValueError(f"{target.name} is tied to other layers; SparseVD needs untied weights")
        self.threshold = float(threshold)
        self.params: dict[str, _Variational] = {}
        self._hooks = {}
        for target in self.targets:
            param = _Variational(target.shape, init_log_sigma2, threshold, device=target.parameter.device)
            attach_parametrization(target, param)
            self._hooks[target.name] = target.module.register_forward_hook(_noise_hook(param))
            self.params[target.name] = param
        self._attached = True

    def _theta(self, target: Target) -> Tensor:
        """The effective mean weights (as the training forward sees them)."""
        plist = target.module.parametrizations[target.param_name]
        theta = plist.original
        for p in plist:
            if p is self.params[target.name]:
                break
            theta = p(theta)
        return theta

    def log_alpha(self) -> dict[str, Tensor]:
        """log alpha of every weight."""
        self._check_attached()
        return {t.name: self.params[t.name].log_alpha(self._theta(t)) for t in self.targets}

    def kl(self) -> Tensor:
        """Sum over all weights of the approximate KL divergence (the ELBO's regulariser)."""
        self._check_attached()
        return sum(kl_approximation(self.params[t.name].log_alpha(self._theta(t))).sum() for t in self.targets)

    def keep_masks(self) -> dict[str, Tensor]:
        """``log alpha < threshold`` for every target (True = kept)."""
        with torch.no_grad():
            return {name: la < self.threshold for name, la in self.log_alpha().items()}

    def sparsity(self) -> float:
        """Fraction of the targets' weights that evaluation zeroes (log alpha >= threshold)."""
        return masks_sparsity(self.keep_masks())

    def to_masks(self) -> dict[str, Tensor]:
        """Mask every weight with log alpha >= threshold and remove the variational parametrization and
        noise: the model then computes what it computed in eval mode. Returns the masks."""
        keep = self.keep_masks()
        self.remove()
        with torch.no_grad():
            return attach_masks(self.model, keep, self.targets)

    def remove(self) -> None:
        """Take the variational parts off (the means theta stay as the weights)."""
        self._check_attached()
        for target in self.targets:
            self._hooks.pop(target.name).remove()
            detach_parametrization(target, self.params[target.name])
        self._attached = False

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("SparseVD was already removed (to_masks() or remove() was called)")

    def __repr__(self) -> str:
        return f"SparseVD(targets={len(self.targets)}, threshold={self.threshold})"
