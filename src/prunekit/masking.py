"""Pruning masks on any parameter, as a ``torch.nn.utils.parametrize`` parametrization.

A mask is a boolean buffer (``True`` = kept) attached to a parameter. The module then computes
``weight = original * mask`` on every access, so pruned entries are exactly zero in the forward pass,
their gradients are zero, and no optimizer step can bring them back into the computation. Because the
mechanism is a standard parametrization, ``copy.deepcopy``, ``state_dict``, optimizers and
``torch.compile`` all see the same thing.

Parameters are named the way users know them (``"fc1.weight"``), never by the parametrization's
internal path (``"fc1.parametrizations.weight.original"``).

This module is called ``masking`` rather than ``masks`` because ``prunekit.masks(model)`` is a function
of the public API, and a submodule of the same name would shadow it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "PruningMask",
    "attach",
    "set_mask",
    "get_mask",
    "masks",
    "sparsity",
    "finalize",
    "remove",
    "raw_parameter",
    "parameter_owners",
    "named_effective_tensors",
    "load_masked_state_dict",
    "from_torch_prune",
    "to_torch_prune",
]

_PARAMETRIZED = ".parametrizations."


class PruningMask(nn.Module):
    """The parametrization: multiplies a parameter by a boolean mask (``True`` = kept)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, original: Tensor) -> Tensor:
        return original * self.mask

    def extra_repr(self) -> str:
        kept = int(self.mask.count_nonzero())
        return f"shape={tuple(self.mask.shape)}, kept={kept}/{self.mask.numel()}"


class Owner(NamedTuple):
    """A module that holds a parameter under a given attribute name."""

    module_name: str
    module: nn.Module
    param_name: str

    @property
    def qualified_name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name


def clean_name(name: str) -> str:
    """``"a.parametrizations.weight.original"`` -> ``"a.weight"``; other names unchanged."""
    if _PARAMETRIZED in "." + name:
        prefix, _, rest = ("." + name).partition(_PARAMETRIZED)
        param = rest.split(".")[0]
        prefix = prefix[1:]
        return f"{prefix}.{param}" if prefix else param
    return name


def _mask_module(module: nn.Module, name: str) -> PruningMask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, PruningMask):
            return p
    return None


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations change.

    torch injects one ``Parametrized<Cls>`` class per module and ``copy.deepcopy`` shares it between the
    copies, so adding or removing a parametrization on one copy would add or delete the property on the
    other too. A private clone of the class keeps each copy independent.
    """
    if parametrize.is_parametrized(module):
        cls = module.__class__
        namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)


@contextlib.contextmanager
def keep_gradient_accumulator() -> Iterator[None]:
    """Around a first ``register_parametrization``: keep the parameter's autograd identity.

    Registering runs ``original.set_(original)`` (torch's ``parametrize._maybe_set``), a no-op on the
    values that gives the parameter a new gradient accumulator. ``DistributedDataParallel`` hooks the old
    one at construction, so a model wrapped in DDP and pruned afterwards would stop averaging that
    parameter's gradients (and raise at the next step). Within this block that self-assignment is
    skipped; any other assignment goes through unchanged.
    """
    maybe_set = getattr(parametrize, "_maybe_set", None)
    if maybe_set is None:  # a torch without the helper: nothing to patch
        yield
        return

    def skip_self_assignment(dest: Tensor, src: Tensor) -> None:
        if dest is not src:
            maybe_set(dest, src)

    parametrize._maybe_set = skip_self_assignment
    try:
        yield
    finally:
        parametrize._maybe_set = maybe_set


def raw_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """The stored parameter, before the mask is applied (the parameter itself when unmasked)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    param = module._parameters.get(name)
    if param is None:
        raise KeyError(f"{type(module).__name__} has no parameter {name!r}")
    return param


def parameter_owners(model: nn.Module) -> dict[int, list[Owner]]:
    """Map ``id(parameter)`` to every (module, attribute) that holds it; tied parameters have several."""
    owners: dict[int, list[Owner]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (parametrize.ParametrizationList, PruningMask)):
            continue
        names = list(module._parameters)
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations.keys())
        for pname in dict.fromkeys(names):
            if pname == "parametrizations":
                continue
            try:
                param = raw_parameter(module, pname)
            except KeyError:
                continue
            if param is None:
                continue
            entry = Owner(module_name, module, pname)
            bucket = owners.setdefault(id(param), [])
            if all(o.module is not module or o.param_name != pname for o in bucket):
                bucket.append(entry)
    return owners


def _owners_of(model: nn.Module, qualified_name: str, owners: Sequence[Owner] | None = None) -> Sequence[Owner]:
    if owners is not None:  # already looked up by the caller (saves a walk over the model per layer)
        return owners
    module_name, _, pname = qualified_name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise KeyError(f"the model has no module {module_name!r} (from {qualified_name!r})") from None
    param = raw_parameter(module, pname)
    return parameter_owners(model)[id(param)]


def attach(
    model: nn.Module,
    qualified_name: str,
    mask: Tensor,
    *,
    copy: bool = True,
    owners: Sequence[Owner] | None = None,
) -> Tensor:
    """Attach ``mask`` to the parameter ``qualified_name``, or tighten the mask it already has.

    The new mask is the logical AND of the old one and ``mask``: nothing pruned comes back. Pruned
    entries of the stored parameter are set to zero too, so that the stored values and the computed
    values agree. A parameter tied to several modules gets one shared mask on every owner.
    Returns the resulting mask. ``copy=False`` lets a new mask tensor be used as it is (the caller
    gives up ownership), which saves a copy per layer; ``owners`` may pass the parameter's owners when
    the caller already knows them.
    """
    owners = _owners_of(model, qualified_name, owners)
    first = owners[0]
    param = raw_parameter(first.module, first.param_name)
    if not param.is_floating_point():
        raise TypeError(f"{qualified_name}: only floating-point parameters can be masked, not {param.dtype}")
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(
            f"{qualified_name}: mask shape {tuple(mask.shape)} does not fit parameter shape {tuple(param.shape)}"
        )
    mask = mask.to(device=param.device, dtype=torch.bool)
    existing = next((m for o in owners if (m := _mask_module(o.module, o.param_name)) is not None), None)
    if existing is None:
        existing = PruningMask(mask.clone() if copy else mask.contiguous())
    else:
        existing.mask.logical_and_(mask)
    for owner in owners:
        if _mask_module(owner.module, owner.param_name) is None:
            _own_class(owner.module)
            with keep_gradient_accumulator():
                parametrize.register_parametrization(owner.module, owner.param_name, existing, unsafe=True)
    with torch.no_grad():
        param.masked_fill_(~existing.mask, 0)
    return existing.mask


def set_mask(
    model: nn.Module,
    qualified_name: str,
    mask: Tensor,
    *,
    owners: Sequence[Owner] | None = None,
) -> Tensor:
    """Replace the mask of ``qualified_name`` by ``mask`` (attach it when there is none).

    Unlike ``attach``, entries may come back: this is for dynamic sparse training (SET, RigL), which
    drops some weights and regrows others at the same sparsity. Entries pruned by the new mask are set
    to zero in the stored parameter, and entries it brings back start at zero too (whatever an
    optimizer did to the stored value while they were masked). Returns the mask now in place.
    """
    owners = _owners_of(model, qualified_name, owners)
    first = owners[0]
    param = raw_parameter(first.module, first.param_name)
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(
            f"{qualified_name}: mask shape {tuple(mask.shape)} does not fit parameter shape {tuple(param.shape)}"
        )
    existing = get_mask(model, qualified_name, owners)
    if existing is None:
        return attach(model, qualified_name, mask, owners=owners)
    mask = mask.to(device=existing.device, dtype=torch.bool)
    with torch.no_grad():
        param.masked_fill_(~(mask & existing), 0)  # only entries kept before and after keep a value
        existing.copy_(mask)
    return existing


def get_mask(model: nn.Module, qualified_name: str, owners: Sequence[Owner] | None = None) -> Tensor | None:
    """The mask of one parameter (``True`` = kept), or ``None`` when it has none."""
    for owner in _owners_of(model, qualified_name, owners):
        found = _mask_module(owner.module, owner.param_name)
        if found is not None:
            return found.mask
    return None


def _masked(model: nn.Module) -> Iterator[tuple[str, list[Owner], PruningMask]]:
    for owner_list in parameter_owners(model).values():
        for owner in owner_list:
            found = _mask_module(owner.module, owner.param_name)
            if found is not None:
                yield owner_list[0].qualified_name, owner_list, found
                break


def masks(model: nn.Module) -> dict[str, Tensor]:
    """Every mask of the model: ``{"layer.weight": bool tensor}``, ``True`` = kept.

    A tied parameter appears once, under the first name that holds it.
    """
    return {name: pm.mask for name, _, pm in _masked(model)}


def sparsity(model: nn.Module, per_layer: bool = False) -> float | dict[str, float]:
    """Fraction of masked entries that are pruned, over all masked parameters (or per parameter)."""
    found = masks(model)
    if per_layer:
        return {name: 1.0 - int(m.count_nonzero()) / m.numel() for name, m in found.items()}
    total = sum(m.numel() for m in found.values())
    if total == 0:
        return 0.0
    return 1.0 - sum(int(m.count_nonzero()) for m in found.values()) / total


def remove(model: nn.Module, qualified_name: str) -> None:
    """Bake one parameter's mask into its values and remove the mask machinery from it."""
    owners = _owners_of(model, qualified_name)
    for owner in owners:
        if _mask_module(owner.module, owner.param_name) is None:
            continue
        if len(owner.module.parametrizations[owner.param_name]) > 1:
            raise RuntimeError(
                f"{owner.qualified_name} has other parametrizations besides its pruning mask; "
                "remove them first"
            )
        _own_class(owner.module)
        parametrize.remove_parametrizations(owner.module, owner.param_name, leave_parametrized=True)
    # remove_parametrizations gives every owner its own new Parameter; re-tie them.
    if len(owners) > 1:
        shared = owners[0].module._parameters[owners[0].param_name]
        for owner in owners[1:]:
            owner.module._parameters[owner.param_name] = shared


def finalize(model: nn.Module) -> nn.Module:
    """Bake every mask into the weights and leave a plain model (pruned entries are stored zeros)."""
    for name in list(masks(model)):
        remove(model, name)
    return model


def named_effective_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every parameter once (tied ones deduplicated), by its user-facing name, as the forward pass sees it."""
    for owner_list in parameter_owners(model).values():
        owner = owner_list[0]
        yield owner.qualified_name, getattr(owner.module, owner.param_name)


def masked_state_dict_keys(model: nn.Module) -> dict[str, str]:
    """Map each ``...parametrizations.W.original`` state-dict key to its clean name."""
    return {k: clean_name(k) for k in model.state_dict() if k.endswith(".original")}


def load_masked_state_dict(model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True):
    """Load a state dict saved from a masked model into ``model``, masked or not.

    Masks found in the state dict (``...parametrizations.W.0.mask``) are attached first, so a fresh,
    unpruned instance of the same architecture can receive it.
    """
    for key, value in state_dict.items():
        if key.endswith(".0.mask") and _PARAMETRIZED in "." + key:
            name = clean_name(key[: -len(".0.mask")] + ".original")
            if get_mask(model, name) is None:
                attach(model, name, value)
    return model.load_state_dict(state_dict, strict=strict)


# --- interoperability with torch.nn.utils.prune ------------------------------------------------


def _torch_pruned(module: nn.Module) -> list[str]:
    from torch.nn.utils import prune as torch_prune

    names = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.PruningContainer):
            names.append(hook._tensor_name)
        elif isinstance(hook, torch_prune.BasePruningMethod):
            names.append(hook._tensor_name)
    return names


def from_torch_prune(model: nn.Module) -> dict[str, Tensor]:
    """Convert every ``torch.nn.utils.prune`` reparametrization (``weight_orig``/``weight_mask``) into
    prunekit masks. The model computes exactly what it did before. Returns the masks converted."""
    from torch.nn.utils import prune as torch_prune

    converted = {}
    for module_name, module in list(model.named_modules()):
        for pname in _torch_pruned(module):
            mask = getattr(module, pname + "_mask").detach().clone().to(torch.bool)
            torch_prune.remove(module, pname)
            qualified = f"{module_name}.{pname}" if module_name else pname
            converted[qualified] = attach(model, qualified, mask)
    return converted


def to_torch_prune(model: nn.Module) -> dict[str, Tensor]:
    """Convert every prunekit mask into ``torch.nn.utils.prune``'s form (``weight_orig`` and
    ``weight_mask``), for code that expects it. Tied parameters cannot be represented there."""
    from torch.nn.utils import prune as torch_prune

    found = list(_masked(model))
    for name, owner_list, _ in found:
        if len(owner_list) > 1:
            raise ValueError(
                f"{name} is tied to {', '.join(o.qualified_name for o in owner_list[1:])}; "
                "torch.nn.utils.prune gives each module its own copy and would untie it"
            )
    converted = {}
    for name, owner_list, pm in found:
        mask = pm.mask.clone()
        owner = owner_list[0]
        remove(model, name)
        torch_prune.custom_from_mask(owner.module, owner.param_name, mask)
        converted[name] = mask
    return converted
