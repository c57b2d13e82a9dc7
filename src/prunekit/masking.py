"""Pruning masks on any parameter, as a ``torch.nn.utils.parametrize`` parametrization.

A mask is a boolean buffer (``True`` = kept) attached to a parameter. The module then computes
``weight = original * mask`` on every access, so pruned entries are exactly zero in the forward pass,
their gradients are zero, and no optimizer step can bring them back into the computation. Because the
mechanism is a standard parametrization, ``copy.deepcopy``, ``state_dict``, optimizers and
``torch.compile`` all see the same thing.

Parameters are named the way users know them (``"fc1.weight"``), never by the parametrization's
internal path (``"fc1.parametrizations.weight.original"``).

**State dicts.** A masked model's ``state_dict()`` has exactly the keys of the dense model (``fc1.weight``),
so ``torch.save``, ``save_pretrained``, trainers' checkpoints and ``load_state_dict`` into an unpruned
instance all just work. The mask travels inside the weight: pruned entries are stored as ``-0.0`` (the
*mark*), kept entries that are zero as ``+0.0``. Both are zero, so a plain model computes exactly what the
masked one did; :func:`restore_masks` (or loading into a model that has masks) turns the marks back into
masks. Loading into a masked model: a state dict with marks replaces the mask (the state dict is the
truth); a plain dense one keeps the mask (like ``torch.nn.utils.prune``, so weight rewinding works) and
its pruned entries are zeroed. Only a parameter whose sole parametrization is the mask is written this
way; one with further parametrizations (regularizer gates) keeps torch's own layout.

This module is called ``masking`` rather than ``masks`` because ``prunekit.masks(model)`` is a function
of the public API, and a submodule of the same name would shadow it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

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
    "clean_name",
    "clean_state_items",
    "load_masked_state_dict",
    "restore_masks",
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


def clean_state_items(state_dict: Mapping[str, Tensor]) -> Iterator[tuple[str, str, Tensor]]:
    """``(clean name, key, value)`` of a state dict's entries, torch's parametrized layout read as the dense
    one: a parametrized parameter comes once, as its unmasked ``...original`` under its own name
    (:func:`clean_name`); the parametrizations' entries (masks, gates) are passed over. Other entries
    come as they are (their clean name is their key)."""
    for key, value in state_dict.items():
        if _PARAMETRIZED in "." + key:
            if key.endswith(".original"):
                yield clean_name(key), key, value
            continue
        yield key, key, value


def _mask_module(module: nn.Module, name: str) -> PruningMask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, PruningMask):
            return p
    return None


def own_class(module: nn.Module) -> None:
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
            own_class(owner.module)
            with keep_gradient_accumulator():
                parametrize.register_parametrization(owner.module, owner.param_name, existing, unsafe=True)
            _install_state_dict_hooks(owner.module)
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


# --- state dicts: dense keys, masks marked as -0.0 ------------------------------------------------


def _sole_mask(module: nn.Module, name: str) -> PruningMask | None:
    """The mask of ``module.name`` when it is the parameter's only parametrization."""
    plist = module.parametrizations[name]
    return plist[0] if len(plist) == 1 and isinstance(plist[0], PruningMask) else None


def _sole_masks(module: nn.Module) -> list[tuple[str, PruningMask]]:
    if not parametrize.is_parametrized(module):
        return []
    return [(n, pm) for n in module.parametrizations.keys() if (pm := _sole_mask(module, n)) is not None]


def marks(value: Tensor) -> Tensor:
    """Where ``value`` holds the mark of a pruned entry: ``-0.0`` (zero with the sign bit set)."""
    return (value == 0) & torch.signbit(value)


def _mark_in_place(value: Tensor, mask: Tensor) -> None:
    """Store pruned entries as ``-0.0`` and kept zeros as ``+0.0``; neither changes what is computed."""
    with torch.no_grad():
        if value.is_meta:
            return
        value.add_(0.0)  # -0.0 + 0.0 = +0.0; every other value unchanged
        value.masked_fill_(~mask, -0.0)


def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    masked = _sole_masks(module)
    if not masked:
        return
    # this module's entries are the last ones written, all under ``prefix``
    tail = []
    for key in reversed(state_dict):
        if not key.startswith(prefix):
            break
        tail.append(key)
    own = {key: state_dict.pop(key) for key in reversed(tail)}
    dense = {}
    for name, pm in masked:
        original = own.pop(f"{prefix}parametrizations.{name}.original", None)
        own.pop(f"{prefix}parametrizations.{name}.0.mask", None)
        if original is None:
            continue
        # in place on the stored parameter: no copy of the model's weights just to save them
        _mark_in_place(original, pm.mask)
        dense[prefix + name] = original
    state_dict.update(dense)
    state_dict.update(own)


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for name, pm in _sole_masks(module):
        key, original_key = prefix + name, f"{prefix}parametrizations.{name}.original"
        mask_key = f"{prefix}parametrizations.{name}.0.mask"
        if key not in state_dict or original_key in state_dict:
            continue  # missing, or torch's own parametrized layout (loads as it is)
        value = state_dict.pop(key)
        mask = pm.mask
        if isinstance(value, Tensor) and not value.is_meta and tuple(value.shape) == tuple(mask.shape):
            found = marks(value)
            if bool(found.any()):
                mask = ~found.to(mask.device)  # saved from a masked model: its mask is the truth
            else:  # a dense state dict: the mask stays, its pruned entries are zeroed
                value = torch.where(mask.to(value.device), value, torch.zeros((), dtype=value.dtype).neg())
        state_dict[original_key] = value
        state_dict.setdefault(mask_key, mask)


def _load_post_hook(module: nn.Module, incompatible) -> None:
    """Report a masked parameter missing from a state dict by its dense name, not torch's internal ones."""
    missing = incompatible.missing_keys
    renamed = []
    for key in missing:
        if _PARAMETRIZED in "." + key and key.endswith(".0.mask"):
            continue
        renamed.append(clean_name(key) if key.endswith(".original") else key)
    missing[:] = list(dict.fromkeys(renamed))


def _install_state_dict_hooks(module: nn.Module) -> None:
    if getattr(module, "_prunekit_state_hooks", False):
        return
    module.register_state_dict_post_hook(_state_dict_post_hook)
    module.register_load_state_dict_pre_hook(_load_pre_hook)
    module.register_load_state_dict_post_hook(_load_post_hook)
    module._prunekit_state_hooks = True


def restore_masks(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Attach a mask wherever a parameter holds marks of pruned entries (``-0.0``), as a masked model's
    ``state_dict`` writes them: after ``load_state_dict`` or ``from_pretrained`` into an unpruned model,
    this gives back the masks. ``names`` limits it to those parameters. Parameters that already have a
    mask keep it. Returns the masks attached."""
    attached = {}
    owners = parameter_owners(model)
    wanted = None if names is None else set(names)
    for owner_list in owners.values():
        first = owner_list[0]
        name = first.qualified_name
        if wanted is not None and name not in wanted:
            continue
        param = raw_parameter(first.module, first.param_name)
        if not param.is_floating_point() or param.is_meta or param.numel() == 0:
            continue
        if any(_mask_module(o.module, o.param_name) is not None for o in owner_list):
            continue
        found = marks(param.detach())
        if bool(found.any()):
            attached[name] = attach(model, name, ~found, copy=False, owners=owner_list)
    return attached


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


SPARSITY_COUNTS = ("auto", "masks", "zeros")


def sparsity(model: nn.Module, per_layer: bool = False, count: str = "auto") -> float | dict[str, float]:
    """How sparse the model is: a fraction over the counted parameters, or one per parameter.

    ``count`` says what is counted:

    ``"masks"``
        entries pruned by a mask, over the masked parameters (0.0 when there are none);
    ``"zeros"``
        entries that are zero in the forward pass (pruned by a mask, or stored as zero), over the masked
        parameters and every parameter with two or more dimensions (the weights of Linear, Conv and
        Embedding layers; biases and normalisation parameters only when masked);
    ``"auto"`` (default)
        ``"masks"`` when the model has masks, else ``"zeros"``: a pruned model reports its sparsity
        after ``pk.finalize`` and after loading into an unpruned instance too.

    ``per_layer=True`` gives ``{"fc.weight": fraction}``, one entry per parameter (a layer's weight and
    bias apart; ``pk.summary`` instead gives one row per layer, all its parameters together).
    """
    if count not in SPARSITY_COUNTS:
        raise ValueError(f"count must be one of {', '.join(SPARSITY_COUNTS)}, not {count!r}")
    found = masks(model)
    if count == "auto":
        count = "masks" if found else "zeros"
    sizes: dict[str, tuple[int, int]] = {}  # name -> (zero entries, entries)
    if count == "masks":
        sizes = {name: (m.numel() - int(m.count_nonzero()), m.numel()) for name, m in found.items()}
    else:
        with torch.no_grad():
            for owner_list in parameter_owners(model).values():
                first = owner_list[0]
                name = first.qualified_name
                value = getattr(first.module, first.param_name)
                if (name not in found and value.dim() < 2) or value.is_meta:
                    continue
                sizes[name] = (value.numel() - int(torch.count_nonzero(value)), value.numel())
    if per_layer:
        return {name: zeros / n if n else 0.0 for name, (zeros, n) in sizes.items()}
    total = sum(n for _, n in sizes.values())
    return sum(z for z, _ in sizes.values()) / total if total else 0.0


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
        own_class(owner.module)
        parametrize.remove_parametrizations(owner.module, owner.param_name, leave_parametrized=True)
    # remove_parametrizations gives every owner its own new Parameter; re-tie them.
    shared = owners[0].module._parameters.get(owners[0].param_name)
    for owner in owners[1:] if shared is not None else ():
        owner.module._parameters[owner.param_name] = shared
    if shared is not None and shared.is_floating_point() and not shared.is_meta:
        with torch.no_grad():
            shared.add_(0.0)  # plain zeros: no -0.0 mark of a mask that is gone (a zero is a zero again)


def removable(model: nn.Module, qualified_name: str) -> bool:
    """Whether :func:`remove` can take this parameter's mask off (no other parametrization on it)."""
    return all(
        _mask_module(o.module, o.param_name) is None or len(o.module.parametrizations[o.param_name]) == 1
        for o in _owners_of(model, qualified_name)
    )


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


def load_masked_state_dict(model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True):
    """Load a state dict saved from a masked model into ``model``, masked or not, masks included.

    The state dict's marks (``-0.0``, see the module docstring) become masks of the parameters that have
    none; torch's parametrized layout (``...parametrizations.W.original`` / ``.0.mask``, written by
    prunekit before 0.2) is read too. Returns what ``load_state_dict`` returns.
    """
    for key, value in state_dict.items():
        if key.endswith(".0.mask") and _PARAMETRIZED in "." + key:
            name = clean_name(key[: -len(".0.mask")] + ".original")
            if get_mask(model, name) is None:
                attach(model, name, value)
    result = model.load_state_dict(state_dict, strict=strict)
    marked = [k for k, v in state_dict.items() if isinstance(v, Tensor) and v.is_floating_point() and k in _names(model)]
    restore_masks(model, marked)
    return result


def _names(model: nn.Module) -> set[str]:
    return {owner.qualified_name for owners in parameter_owners(model).values() for owner in owners}


# --- interoperability with torch.nn.utils.prune ------------------------------------------------


def _torch_pruned(module: nn.Module) -> list[str]:
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
