"""Which parameters a pruning call touches: resolving ``targets`` and ``exclude`` into ``Target``s."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from .masking import Owner, get_mask, parameter_owners, raw_parameter
from .modules import is_gpt_conv1d, matches

__all__ = ["Target", "resolve_targets", "default_target_modules"]

# Layers whose weight is pruned when the user names no targets.
_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True, eq=False)
class Target:
    """One parameter to prune, with what the granularities need to know about its layout."""

    name: str  # user-facing, e.g. "features.0.weight"
    module_name: str
    module: nn.Module
    param_name: str
    out_dim: int  # the dimension indexing output units (filters, neurons)
    in_dim: int  # the dimension indexing input units (channels, features)
    owners: tuple[Owner, ...] = ()  # every (module, attribute) holding the parameter (tied weights)

    @property
    def parameter(self) -> nn.Parameter:
        """The stored parameter (before the mask)."""
        return raw_parameter(self.module, self.param_name)

    @property
    def value(self) -> Tensor:
        """The parameter as the forward pass sees it (masked entries are zero)."""
        return getattr(self.module, self.param_name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.parameter.shape)

    def numel(self) -> int:
        return self.parameter.numel()

    def mask(self, model: nn.Module) -> Tensor | None:
        return get_mask(model, self.name, self.owners or None)


def _layout(module: nn.Module, param_name: str) -> tuple[int, int]:
    """(out_dim, in_dim) of a weight: ConvTranspose and GPT-2's Conv1D store (in, out, ...)."""
    if param_name == "weight":
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return 1, 0
        if is_gpt_conv1d(module):  # transformers' GPT-2 layer
            return 1, 0
    return 0, 1


def default_target_modules(model: nn.Module) -> list[str]:
    """Names of the modules pruned by default: every Linear and convolution (and GPT-2's Conv1D)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, _DEFAULT_TYPES) or is_gpt_conv1d(module):
            names.append(name)
    return names


def resolve_targets(
    model: nn.Module,
    targets: Iterable[str | type[nn.Module]] | str | None = None,
    exclude: Iterable[str] | str = (),
    require_trainable: bool = True,
) -> list[Target]:
    """Turn ``targets`` and ``exclude`` into the list of parameters to prune, in model order.

    ``targets=None`` means the weight of every Linear and convolution. Otherwise each entry is a module
    type, or a name or glob pattern of modules (their ``weight`` is taken; a module name covers the
    modules inside it), or, when it names no module, of parameters (``"fc1.bias"``). ``exclude`` takes module or parameter names or globs. Every pattern must match
    something; integer parameters, and frozen ones when ``require_trainable``, are rejected.
    """
    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if type(hook).__module__ == "torch.nn.utils.prune":
                raise ValueError(
                    f"{module_name or 'the model'} is pruned with torch.nn.utils.prune; "
                    "convert it first with prunekit.from_torch_prune(model)"
                )
    owners = parameter_owners(model)
    # Every parameter once, by the first name that holds it.
    params: dict[str, tuple[str, nn.Module, str]] = {}
    for owner_list in owners.values():
        o = owner_list[0]
        params[o.qualified_name] = (o.module_name, o.module, o.param_name)
    aliases = {}  # any owner's name -> canonical name, so tied names resolve too
    for owner_list in owners.values():
        for o in owner_list:
            aliases[o.qualified_name] = owner_list[0].qualified_name

    if isinstance(targets, (str, type)):
        targets = [targets]
    if isinstance(exclude, str):
        exclude = [exclude]
    exclude = list(exclude)

    chosen: dict[str, None] = {}
    if targets is None:
        for module_name in default_target_modules(model):
            name = f"{module_name}.weight" if module_name else "weight"
            if name in aliases:
                chosen[aliases[name]] = None
        if not chosen:
            raise ValueError("the model has no Linear or convolution layer to prune; name the targets")
    else:
        modules = dict(model.named_modules())
        for pattern in targets:
            found = []
            if isinstance(pattern, type):
                found = [
                    aliases[f"{n}.weight" if n else "weight"]
                    for n, m in modules.items()
                    if isinstance(m, pattern) and (f"{n}.weight" if n else "weight") in aliases
                ]
                label = pattern.__name__
            else:
                label = repr(pattern)
                # Modules first (their weight); a pattern naming no module may name parameters.
                for n in modules:
                    name = f"{n}.weight" if n else "weight"
                    if matches(n, pattern) and name in aliases:
                        found.append(aliases[name])
                if not found:
                    found = [aliases[n] for n in aliases if matches(n, pattern, inside=False)]
            if not found:
                raise ValueError(f"target {label} matches no parameter or module with a weight")
            chosen.update(dict.fromkeys(found))

    for pattern in exclude:
        hit = [n for n in chosen if matches(n, pattern) or matches(n.rpartition(".")[0], pattern)]
        if not hit:
            raise ValueError(f"exclude pattern {pattern!r} matches none of the targets")
        for n in hit:
            chosen.pop(n, None)
    if not chosen:
        raise ValueError("every target is excluded: nothing left to prune")

    resolved = []
    for name in params:  # model order
        if name not in chosen:
            continue
        module_name, module, param_name = params[name]
        param = raw_parameter(module, param_name)
        if not param.is_floating_point():
            raise TypeError(f"cannot prune {name}: it holds {param.dtype} values, not floating point")
        if require_trainable and not param.requires_grad:
            raise ValueError(
                f"cannot prune {name}: it is frozen (requires_grad=False); unfreeze it or exclude it"
            )
        out_dim, in_dim = _layout(module, param_name)
        owner_list = tuple(owners[id(param)])
        resolved.append(Target(name, module_name, module, param_name, out_dim, in_dim, owner_list))
    return resolved
