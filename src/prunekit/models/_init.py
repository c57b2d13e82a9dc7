"""Weight initialisation shared by the reference models."""

from __future__ import annotations

from torch import nn


def kaiming_init_(model: nn.Module) -> None:
    """Initialise ``model`` in place: Kaiming-normal convs, unit/zero batch norms.

    Convolutions get ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` and zero biases, batch
    norms weight 1 and bias 0; linear layers keep PyTorch's default initialisation. All randomness
    comes from torch's global RNG, so ``torch.manual_seed`` before construction makes it reproducible.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
