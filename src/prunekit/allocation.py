"""Automated per-layer sparsity allocation under a FLOPs (or measured-latency) budget: a greedy search.

``greedy_allocation`` returns ``{layer: sparsity}`` for ``pk.prune(model, scope=ratios, method=...)``:

    ratios = pk.allocation.greedy_allocation(model, budget=0.2, data=calibration)   # keep 20% of FLOPs
    pk.prune(model, scope=ratios, method="magnitude")

The search is NetAdapt's (Yang et al. 2018) greedy loop, one of the options the seeds' "learning to
prune" names beside AMC (He et al. 2018): start dense; at every step try, for each layer, pruning ``step``
more of it (its lowest-scored weights by ``method``), measure the calibration loss of the whole network,
and keep the move that costs the least loss per FLOP saved; stop when the cost is within the budget.

Why greedy rather than AMC's DDPG agent: on a budget it needs only forward passes (about
``layers^2 / step`` loss evaluations, seconds on digits), it is deterministic, it has no agent
hyper-parameters to tune, and it measures the real loss of each candidate with all other layers already
pruned (interactions between layers are seen, which per-layer sensitivity curves miss). AMC's agent
pays hundreds of episodes to learn a policy that transfers to larger search spaces; for the networks a
user prunes with prunekit in one call, the direct search is cheaper and at least as good.

The cost is the dense FLOPs of the targeted layers times their density (multiply-adds per sample of each
Linear and convolution, measured with hooks on one batch), or any ``cost(ratios) -> float`` given, such
as a measured latency; ``budget`` is then a fraction of ``cost`` of the dense model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import islice

import torch
from torch import Tensor, nn

from .criteria import Criterion, get_criterion
from .granularity import num_to_prune
from .modules import eval_mode
from .statistics import LossFn, batch_loss
from .targets import Target, resolve_targets

__all__ = ["greedy_allocation", "layer_flops", "flops_cost"]


def layer_flops(model: nn.Module, targets: list[Target], example_inputs: Tensor) -> dict[str, float]:
    """Dense multiply-adds per sample of each target's layer (Linear: in x out per position; convolution:
    output elements x in/groups x kernel size)."""
    found: dict[str, float] = {}

    def hook(target: Target):
        def record(module, args, output):
            batch = args[0].shape[0] if args[0].dim() > 1 else 1
            weight = target.value
            per_output = weight.numel() / weight.shape[0] if not isinstance(module, nn.modules.conv._ConvTransposeNd) \
                else weight.numel() / weight.shape[1]
            found[target.name] = found.get(target.name, 0.0) + output.numel() / batch * per_output
        return record

    handles = [t.module.register_forward_hook(hook(t)) for t in targets]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [t.name for t in targets if t.name not in found]
    if missing:
        raise ValueError(f"the example input never ran {', '.join(missing)}; FLOPs unknown")
    return found


def flops_cost(flops: Mapping[str, float]) -> Callable[[Mapping[str, float]], float]:
    """``cost(ratios)``: the layers' dense FLOPs times their densities, summed."""
    return lambda ratios: sum(f * (1.0 - ratios.get(name, 0.0)) for name, f in flops.items())


def _first_inputs(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    if isinstance(batch, Tensor):
        return batch
    raise TypeError("greedy_allocation: batches must be (inputs, labels)")


def greedy_allocation(
    model: nn.Module,
    budget: float,
    data: Iterable,
    method: str | Criterion = "magnitude",
    *,
    targets=None,
    exclude=(),
    loss_fn: LossFn | None = None,
    step: float = 0.05,
    max_layer_sparsity: float = 0.98,
    max_batches: int | None = 4,
    cost: Callable[[Mapping[str, float]], float] | None = None,
) -> dict[str, float]:
    """Per-layer sparsities that bring ``cost`` to ``budget`` x its dense value, chosen greedily by the
    calibration loss (see the module docstring).

    Args:
        budget: fraction of the dense cost to keep, in (0, 1) (0.2 = a fifth of the FLOPs).
        data: calibration batches ``(inputs, labels)``; the first ``max_batches`` are kept and reused.
        method: a data-free criterion ranking the weights inside each layer (default magnitude).
        step: sparsity added to one layer per greedy move.
        max_layer_sparsity: no layer goes beyond this.
        cost: ``cost(ratios) -> float`` (e.g. measured latency); default the targets' FLOPs.

    The model is not changed (candidates are tried on the weights and put back).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1), got {budget!r}")
    if not 0.0 < step < 1.0:
        raise ValueError(f"step must be in (0, 1), got {step!r}")
    if not 0.0 < max_layer_sparsity < 1.0:
        raise ValueError(f"max_layer_sparsity must be in (0, 1), got {max_layer_sparsity!r}")
    criterion = get_criterion(method)
    if criterion.needs_data:
        raise ValueError(f"greedy_allocation ranks weights inside a layer with a data-free method; "
                         f"{criterion.name!r} needs data")
    layers = resolve_targets(model, targets, exclude)
    batches = list(islice(data, max_batches))
    if not batches:
        raise ValueError("greedy_allocation: the calibration data yielded no batch")
    if cost is None:
        cost = flops_cost(layer_flops(model, layers, _first_inputs(batches[0])))
    with torch.no_grad():
        order = {t.name: torch.argsort(criterion.score(t, None, index=i).reshape(-1), stable=True)
                 for i, t in enumerate(layers)}
        original = {t.name: t.parameter.detach().clone() for t in layers}
    ratios = {t.name: 0.0 for t in layers}
    target_cost = budget * cost(ratios)

    def set_layer(t: Target, sparsity: float) -> None:
        flat = original[t.name].reshape(-1).clone()
        flat[order[t.name][: num_to_prune(sparsity, flat.numel())]] = 0
        t.parameter.copy_(flat.reshape(t.shape))

    def loss() -> float:
        return sum(float(batch_loss(model, b, loss_fn)) for b in batches) / len(batches)

    try:
        with eval_mode(model), torch.no_grad():
            current_loss, current_cost = loss(), cost(ratios)
            while current_cost > target_cost:
                best = None
                for t in layers:
                    new = min(ratios[t.name] + step, max_layer_sparsity)
                    if new <= ratios[t.name]:
                        continue
                    trial = {**ratios, t.name: new}
                    saved = current_cost - cost(trial)
                    if saved <= 0:
                        continue
                    set_layer(t, new)
                    trial_loss = loss()
                    set_layer(t, ratios[t.name])
                    value = (trial_loss - current_loss) / saved
                    if best is None or value < best[0]:
                        best = (value, t, new, trial_loss)
                if best is None:
                    raise ValueError(f"budget {budget:g} cannot be reached with max_layer_sparsity={max_layer_sparsity:g}")
                _, t, new, current_loss = best
                set_layer(t, new)
                ratios[t.name] = new
                current_cost = cost(ratios)
    finally:
        with torch.no_grad():
            for t in layers:
                t.parameter.copy_(original[t.name])
    return {name: round(s, 6) for name, s in ratios.items()}
