"""Finding a transformer's blocks and the prunable layers inside them, for any Hugging Face layout.

The blocks are the repeated decoder or encoder layers (``model.layers`` of Llama, Mistral and Qwen2,
``model.decoder.layers`` of OPT, ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT). They are found
generically: the ``nn.ModuleList`` whose children all have one class and hold the most weights of the
model. Inside a block, every ``nn.Linear`` and every GPT-2 ``Conv1D`` (weight stored as ``(in, out)``) is
a prunable layer. Everything outside the blocks (embeddings, the final norm, the LM head) is left alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..masking import get_mask, raw_parameter
from ..modules import is_gpt_conv1d, matches

__all__ = ["find_blocks", "block_layers", "BlockLayer", "is_prunable", "weight_matrix", "matrix_to_weight"]


def is_prunable(module: nn.Module) -> bool:
    """A Linear or a GPT-2 Conv1D: what the LLM methods prune."""
    return isinstance(module, nn.Linear) or is_gpt_conv1d(module)


def _weight_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the model's transformer blocks.

    ``path`` names the list explicitly (``"model.layers"``); otherwise the ``ModuleList`` whose children
    share one class, contain Linear (or ``Conv1D``) layers, and hold the most parameters is taken.
    """
    if path is not None:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the model has no module {path!r} (blocks=)") from None
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(f"blocks={path!r} is a {type(found).__name__}, not a non-empty nn.ModuleList")
        return path, found
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_prunable(m) for m in module[0].modules()):
            continue
        size = _weight_count(module)
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList of identical "
            "blocks with Linear layers; name them with blocks='path.to.layers'"
        )
    return best[1], best[2]


@dataclass(frozen=True, eq=False)
class BlockLayer:
    """One prunable layer inside a block: its names and its module."""

    name: str  # full name in the model, e.g. "model.layers.3.mlp.down_proj"
    local_name: str  # name inside the block, e.g. "mlp.down_proj"
    module: nn.Module

    @property
    def conv1d(self) -> bool:
        return is_gpt_conv1d(self.module)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def in_features(self) -> int:
        w = raw_parameter(self.module, "weight")
        return w.shape[0] if self.conv1d else w.shape[1]

    @property
    def out_features(self) -> int:
        w = raw_parameter(self.module, "weight")
        return w.shape[1] if self.conv1d else w.shape[0]


def block_layers(
    block: nn.Module, block_name: str, exclude: Iterable[str] = (), used: set[str] | None = None
) -> list[BlockLayer]:
    """The prunable layers of one block, minus those matching ``exclude`` (module names or globs, matched
    against the full name and the name inside the block). Patterns that matched are added to ``used``."""
    layers = []
    for local, module in block.named_modules():
        if not local or not is_prunable(module):
            continue
        full = f"{block_name}.{local}"
        hit = [p for p in exclude if matches(full, p) or matches(local, p) or matches(full + ".weight", p)]
        if hit:
            if used is not None:
                used.update(hit)
            continue
        layers.append(BlockLayer(full, local, module))
    return layers


def weight_matrix(layer: BlockLayer) -> Tensor:
    """The effective weight as an ``(out, in)`` float32 matrix (a copy), masks applied."""
    w = layer.module.weight.detach()
    w = w.t() if layer.conv1d else w
    return w.to(torch.float32).clone(memory_format=torch.contiguous_format)


def matrix_to_weight(layer: BlockLayer, matrix: Tensor) -> Tensor:
    """An ``(out, in)`` matrix in the layer's own storage layout."""
    return matrix.t() if layer.conv1d else matrix


def current_keep(model: nn.Module, layer: BlockLayer, owners=None) -> Tensor | None:
    """The layer's existing prunekit mask as an ``(out, in)`` matrix, or None. ``owners``: the weight's owners
    (``masking.parameter_owners(model)[id(weight)]``) when the caller has them, saving a walk over the model."""
    mask = get_mask(model, layer.weight_name, owners)
    if mask is None:
        return None
    return mask.t() if layer.conv1d else mask
